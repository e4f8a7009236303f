"""The search-efficiency benchmark's scoring: exact hypervolume and the ratios against the random baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_benchmark):  # noqa: ANN001, ANN201 - the benchmark module
    return load_benchmark("search_efficiency")


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


def test_speed_space_has_every_compute_axis(bench) -> None:  # noqa: ANN001
    """--space speed: the rich MiniLM space of issue 13 validates, prices latency with the calibrated profile
    and offers heads, neurons, rank, bits, group size and the compute kernel."""
    from slimformer.search.config import SearchConfig

    cfg = SearchConfig.model_validate(bench.SPEED_CONFIG | {"trials": 100})
    assert cfg.latency.source == "calibrated" and cfg.hardware_profile == "amd-epyc-avx512-1t-ort1-32"
    assert cfg.budget.memory == "15%" and cfg.objectives == ["quality", "latency", "memory"]
    attn, ffn = cfg.space.groups[1], cfg.space.groups[2]
    assert attn.heads_kept[0] == 12 and ffn.neurons_kept[0] == 1.0  # "keep all" first (uniform start points)
    for g in (attn, ffn):
        assert set(g.kernel) == {"exact", "int8"} and set(g.bits) == {8, 4} and len(g.rank_fraction) == 2


def test_docs_sections_are_separate(bench, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Each space writes its own marked section of BENCHMARKS.md and leaves the other one alone."""
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir()
    doc.write_text("# B\n<!-- search_efficiency:begin -->\nold quickstart\n<!-- search_efficiency:end -->\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    norm = {"quality_ref": 0.9, "quality_ref_from": "x", "memory_ref": 13.5e6, "memory_ideal": 12e6,
            "latency_ref": 35.0, "latency_ideal": 14.0}
    run = {"arm": "random", "seed": 0, "finished": True, "trial_seconds": 1.0,
           "100": {"hv": 0.1, "hv_start_points": 0.1, "best_quality": 0.95, "counted": 100, "over_budget": 0,
                   "front": 3, "front_start_points": 1}}
    r = {"date": "d", "command": "c", "torch_threads": 1, "loadavg": [1.0, 1.0, 1.0], "budget_percent": 15.0,
         "quality_metric": "cosine", "normalisation": norm, "objectives": ["quality", "latency", "memory"],
         "hv_axes": ["quality", "latency", "memory"], "over_budget_cap": 3, "random_plans_that_fit": 0.1,
         "runs": [run], "summary": {"random": {"100": 0.1, "seeds": [0]}}}
    bench.update_docs(r, [100], "search_efficiency_speed")
    text = doc.read_text()
    assert "old quickstart" in text and "<!-- search_efficiency_speed:begin -->" in text
    assert "(all three objectives)" in text and "| random | 0 | 0.10000 |" in text
