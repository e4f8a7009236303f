"""The search-efficiency benchmark's scoring: exact hypervolume and the ratios against the random baselines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the benchmark module
    spec = importlib.util.spec_from_file_location("search_efficiency", ROOT / "benchmarks" / "search_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hypervolume_of_boxes(bench) -> None:  # noqa: ANN001
    assert bench.hypervolume([]) == 0.0
    assert bench.hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    # two boxes overlapping in [0, 0.5] x [0, 0.5]: 0.5 + 0.5 - 0.25
    assert bench.hypervolume([(1.0, 0.5), (0.5, 1.0)]) == pytest.approx(0.75)
    # a dominated point adds nothing; a point on an axis (goodness 0) adds nothing
    assert bench.hypervolume([(1.0, 0.5), (0.4, 0.4), (0.9, 0.0)]) == pytest.approx(0.5)
    assert bench.hypervolume([(0.5, 0.5, 0.5), (1.0, 1.0, 0.1)]) == pytest.approx(0.125 + 0.1 - 0.025)


def test_summary_divides_by_every_random_baseline(bench) -> None:  # noqa: ANN001
    def run(arm: str, seed: int, hv: float) -> dict:
        return {"arm": arm, "seed": seed, "finished": True, "trial_seconds": 1.0, "100": {"hv": hv}}

    runs = [run("nsga2-repair", 0, 0.6), run("nsga2-repair", 1, 0.8), run("random-repair-bare", 0, 0.2),
            run("random-repair-bare", 1, 0.2), run("random", 0, 0.7),
            {**run("random", 1, 0.1), "finished": False}]  # unfinished runs are left out of the means
    out = bench.summarise(runs, [100])
    assert out["nsga2-repair"]["100"] == pytest.approx(0.7)
    assert out["random"]["seeds"] == [0]
    assert out["nsga2-repair"]["vs_random-repair-bare_100"] == pytest.approx(3.5)
    assert out["nsga2-repair"]["vs_random_100"] == pytest.approx(1.0)
