"""benchmarks/latency_profiles.py end to end with tiny settings: real calibrations and real validation timing,
JSON and the docs section written where told."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from slimformer.hardware_profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the benchmark module
    spec = importlib.util.spec_from_file_location("latency_profiles", ROOT / "benchmarks" / "latency_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(tmp_path: Path) -> list[str]:
    doc = tmp_path / "BENCHMARKS.md"
    if not doc.exists():
        doc.write_text("# Benchmarks\n")
    return ["--configs", "3", "--runs", "3", "--min-pass-s", "0.2", "--models", "vit-fmnist",
            "--results", str(tmp_path / "results"), "--doc", str(doc)]


def test_calibration_benchmark_times_scores_and_compares(bench, tmp_path: Path) -> None:  # noqa: ANN001
    assert bench.main(["calibration", "--tiny", *_args(tmp_path)]) == 0
    data = json.loads((tmp_path / "results" / "latency_profiles_calibration.json").read_text())
    assert set(data["timing"]) == {"full_a", "full_b", "quick"}
    for t in data["timing"].values():
        assert t["seconds"] > 0 and t["budget_seconds"] == 30 and load_profile(tmp_path / "results" / "profiles" /
                                                                          Path(t["profile"]).name).calibrated
    (m,) = data["models"]
    assert m["model"] == "ViT 1x17" and m["plans"] == 3 and set(m["scores"]) == {"full_a", "full_b", "quick"}
    assert 0 <= m["full_agreement"]["within_3"] <= 1 and -2 <= m["quick_vs_full"]["tau_difference"] <= 2
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- latency-profiles-calibration:begin -->" in doc and "| ViT 1x17 (3) | quick |" in doc


def test_revalidate_benchmark_validates_the_profiles_of_this_cpu(bench, tmp_path: Path) -> None:  # noqa: ANN001
    from slimformer.hardware_profiles import list_profiles
    from slimformer.hardware_profiles.machine import cpu_info

    assert bench.main(["revalidate", *_args(tmp_path)]) == 0
    data = json.loads((tmp_path / "results" / "latency_profiles_revalidate.json").read_text())
    mine = [n for n in list_profiles() if load_profile(n).calibrated and load_profile(n).cpu == cpu_info()[0]]
    assert data["cpu"] == cpu_info()[0] and [p["profile"] for p in data["profiles"]] == mine
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- latency-profiles-revalidate:begin -->" in doc and data["cpu"] in doc
    for p in data["profiles"]:
        assert [r["model"] for r in p["results"]] == ["ViT 1x17"] and p["results"][0]["configs"] == 3
        assert f"`{p['profile']}` | ViT 1x17 | 3 |" in doc
