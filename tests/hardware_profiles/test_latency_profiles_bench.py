"""benchmarks/latency_profiles.py end to end with tiny settings: real calibrations and real validation timing,
JSON and the docs section written where told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimformer.hardware_profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_benchmark):  # noqa: ANN001, ANN201 - the benchmark module
    return load_benchmark("latency_profiles")


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
    assert [r["name"] for r in m["rows"]] == ["fp32", "int8", "int4-g32", "int4-g128", "plan000", "plan001", "plan002"]
    assert all(r["measured_ms"] > 0 and set(r["predicted_ms"]) == {"full_a", "full_b", "quick"} for r in m["rows"])
    quick_path = tmp_path / "results" / "profiles" / Path(data["timing"]["quick"]["profile"]).name
    quick = load_profile(quick_path)
    (local,) = quick.latency_model.local_residual["timm"]  # fitted on the reference and 2 sampled plans at 1x17
    assert (local.batch, local.seq) == (1, 17) and sum(f.startswith("vit-fmnist:sample") for f in local.fitted_on) == 2
    # the stored rows are re-scored without timing, by the profiles it saved
    assert bench.main(["rescore", "--measured", str(tmp_path / "results" / "latency_profiles_calibration.json"),
                       "--profiles", str(quick_path),
                       "--fewshot", "1", "--splits", "2", *_args(tmp_path)[-4:]]) == 0
    again = json.loads((tmp_path / "results" / "latency_profiles_rescore.json").read_text())["results"][0]
    assert again["as_is"] == pytest.approx(m["scores"]["quick"], abs=1e-3) and again["plans"] == 3
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


def test_rescore_of_stored_measurements_shows_the_few_shot_residual_fixing_the_level(bench, tmp_path: Path
                                                                                      ) -> None:  # noqa: ANN001
    """Real data, no timing: the ViT's 60 held-out plans measured 2026-11-28 17:22 (quiet), priced by the full
    calibration of 2026-12-02 04:34, whose global residual is 34% off there; its kernel tables with the local
    residual fitted on the baselines and 10 plans timed half an hour earlier (16:54) are within a few percent."""
    res = ROOT / "benchmarks" / "results"
    args = ["rescore", "--measured", str(res / "profile-validate-amd-epyc-avx512-1t-ort1-32-vit-fmnist.json"),
            "--fit-measured", str(res / "latency_measured" / "validate-2026-11-28T16-54-vit-fmnist.json"),
            "--profiles", str(res / "profiles" / "calibration-2026-12-02-s6-full_a.yaml"), "--splits", "5",
            "--results", str(tmp_path), "--doc", str(tmp_path / "B.md")]
    (tmp_path / "B.md").write_text("# B\n")
    assert bench.main(args) == 0
    (e,) = json.loads((tmp_path / "latency_profiles_rescore.json").read_text())["results"]
    assert e["plans"] == 60 and e["as_is"]["mape"] > 0.3 and e["fit_measured"] != e["measured"]
    assert e["fewshot"]["mape"] < 0.04 and e["fewshot"]["within_10"] == 1.0 and e["fewshot"]["kendall_tau"] > 0.85
    assert "| 2026-11-28T17:23:30+00:00 (2026-11-28T16:55:42+00:00) | vit-fmnist 1x17 (60) |" in \
        (tmp_path / "B.md").read_text()


def test_prepare_exports_what_calibration_and_validation_time(bench, tmp_path: Path) -> None:  # noqa: ANN001
    work = tmp_path / "work"
    assert bench.main(["prepare", "--work-dir", str(work), *_args(tmp_path)]) == 0
    assert sorted(p.stem for p in (work / "validate" / "vit-fmnist").glob("*.onnx")) == \
        ["fp32", "int4-g128", "int4-g32", "int8", "plan000", "plan001", "plan002"]
    cal = sorted(p.stem for p in (work / "calibrate" / "vit-fmnist").glob("*.onnx"))
    assert [c for c in cal if c.startswith("sample")] == [f"sample{i:02d}" for i in range(8)] and "fp32" in cal
    stamp = (work / "calibrate" / "vit-fmnist" / "sample00.onnx").stat().st_mtime_ns
    assert bench.main(["prepare", "--work-dir", str(work), *_args(tmp_path)]) == 0  # reused, not exported again
    assert (work / "calibrate" / "vit-fmnist" / "sample00.onnx").stat().st_mtime_ns == stamp
