"""budget.latency: plans over it are never evaluated and never on the front, repair and start points honour it, an
unreachable budget stops the search before anything is written, and a foreign hardware profile is said in one line.

The space prunes heads and FFN neurons and the latency shape is batch 16 x seq 128, so the tiny BERT's predicted
latency (roofline, the shipped torch profile) spans 0.89 ms (2 heads, a quarter of the neurons) to 1.68 ms (fp32);
bits and group size barely move it. A 1.1 ms budget forces 2 heads in both layers.
"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import invoke, study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.compression.plan import CompressionPlan
from slimformer.errors import BudgetError, SlimformerWarning
from slimformer.hardware_profiles import load_profile
from slimformer.search.config import SearchConfig
from slimformer.search.context import SearchContext, fastest_params, prepare
from slimformer.search.records import TrialRecord
from slimformer.search.repair import latency_order, repair_params

SPACE = {"groups": [
    {"select": {"role": ["embedding"]}, "bits": [8, 4], "group_size": [16, 32]},
    {"select": {"role": ["query", "key", "value", "attn_out"]}, "bits": [8, 4], "heads_kept": [4, 2]},
    {"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4], "neurons_kept": [1.0, 0.25]},
]}
LATENCY = {"batch": 16, "seq": 128}
TIGHT_MS = 1.1


def _config(model: Path, run_dir: Path, latency_budget: str, **overrides: Any) -> dict[str, Any]:
    over = {"baselines": False, "space": SPACE, "latency": LATENCY,
            "budget": {"memory": "40%", "latency": latency_budget}} | overrides
    return tiny_config(model, run_dir, **over)


def _ctx(model: Path, tmp_path: Path, latency_budget: str = f"{TIGHT_MS}ms", **overrides: Any) -> SearchContext:
    return prepare(SearchConfig.model_validate(_config(model, tmp_path / "run", latency_budget, **overrides)))


def _ms(ctx: SearchContext, params: dict[str, Any]) -> float:
    return ctx.latency_source().price(ctx.adapter, ctx.space.plan_from_params(params)).ms


def test_budgets_resolve_absolute_and_relative_to_fp32(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx = _ctx(tiny_model_dir, tmp_path)
    assert ctx.latency_budget_ms == pytest.approx(TIGHT_MS) and ctx.fp32_latency_ms is None
    rel = _ctx(tiny_model_dir, tmp_path, "0.8x")
    fp32 = rel.latency_source().price(rel.adapter, CompressionPlan()).ms
    assert rel.fp32_latency_ms == pytest.approx(fp32) and rel.latency_budget_ms == pytest.approx(0.8 * fp32)
    assert 1.5 < fp32 < 1.9, "the space's latency range this file's budgets are chosen for"
    assert ctx.over_budget(ctx.budget_bytes, TIGHT_MS) == []
    assert ctx.over_budget(ctx.budget_bytes + 1, TIGHT_MS + 0.01) == ["memory", "latency"]
    assert ctx.violation(ctx.budget_bytes, TIGHT_MS * 1.5) == pytest.approx(0.5)


def test_fastest_plan_is_the_fastest_of_the_whole_space(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx = _ctx(tiny_model_dir, tmp_path)
    dists = ctx.space.distributions()
    every = [dict(zip(dists, combo)) for combo in itertools.product(*(d.choices for d in dists.values()))]
    best = min(_ms(ctx, p) for p in every)
    found = fastest_params(ctx.space, lambda plan: ctx.latency_source().price(ctx.adapter, plan).ms)
    assert _ms(ctx, found) == pytest.approx(best, rel=1e-12)
    assert all(v == 2 for k, v in found.items() if k.endswith("heads_kept"))


@pytest.mark.parametrize("budget", ["0.5x", "0.8ms"])
def test_unreachable_latency_budget_names_the_fastest_plan_and_writes_nothing(
        tmp_path: Path, tiny_model_dir: Path, budget: str) -> None:
    with pytest.raises(BudgetError, match=rf"^budget\.latency {budget}( of the fp32 model's 1\.\d+ ms = 0\.\d+ ms)? "
                                          r"is below the fastest plan of the space \(predicted 0\.8\d+ ms at batch 16, "
                                          r"seq 128 on profile amd-epyc-avx512-2t-torch\); raise it or add faster "
                                          r"choices"):
        _ctx(tiny_model_dir, tmp_path, budget)
    assert not (tmp_path / "run").exists()


def test_repair_brings_plans_under_both_budgets(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx = _ctx(tiny_model_dir, tmp_path)
    order = ctx.space.choice_costs()
    lat_order = latency_order(ctx)
    assert lat_order is not None and all(v[0] == 2 for k, v in lat_order.items() if k.endswith("heads_kept"))
    rng = random.Random(0)
    repaired = 0
    for _ in range(20):
        params = {n: rng.choice(c) for n, c in order.items()}
        fixed, steps = repair_params(ctx, params, order, {}, lat_order)
        plan = ctx.space.plan_from_params(fixed)
        assert ctx.over_budget(ctx.memory(plan), _ms(ctx, fixed)) == []
        if not ctx.over_budget(ctx.memory(ctx.space.plan_from_params(params)), _ms(ctx, params)):
            assert (fixed, steps) == (params, 0), "a plan within both budgets is left alone"
        else:
            repaired += 1
            assert steps >= 1
    assert repaired >= 5
    # without a latency budget nothing changes for plans that fit the memory budget
    free = _ctx(tiny_model_dir, tmp_path, "10ms")
    slow = {n: c[-1] for n, c in order.items()} | {"g0.emb.bits": 4, "g0.emb.group_size": 32}
    assert repair_params(free, slow, order, {}, latency_order(free)) == (slow, 0)


def _stored(res_storage: str) -> list:
    return [t for t in study_trials(res_storage) if t.state != TrialState.WAITING]


def test_search_with_a_tight_latency_budget_evaluates_and_fronts_only_plans_under_it(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """CLI run with repair and start points, on a profile copied with another CPU name: one mismatch line."""
    prof = load_profile("amd-epyc-avx512-2t-torch").model_dump(mode="json") | {"cpu": "Some Other CPU"}
    prof_path = tmp_path / "other-cpu.yaml"
    prof_path.write_text(yaml.safe_dump(prof, sort_keys=False))
    cfg = _config(tiny_model_dir, tmp_path / "run", f"{TIGHT_MS}ms", trials=8, baselines=True,
                  hardware_profile=str(prof_path))
    res = invoke("search", write_config(tmp_path / "search.yaml", cfg), "--no-progress")
    assert res.exit_code == 0, res.stderr
    said = [ln for ln in res.stderr.splitlines() if "made elsewhere" in ln]
    # --no-progress: no [slimformer] lines, so the mismatch is the CLI's one `warning:` line (a notice, said once)
    assert len(said) == 1 and said[0].startswith("warning: hardware profile") and "Some Other CPU" in said[0]
    assert not [ln for ln in res.stderr.splitlines() if "Warning" in ln or ".py:" in ln], res.stderr
    run = tmp_path / "run"
    trials = study_trials(f"sqlite:///{run / 'study.db'}")
    assert trials and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # every priced trial carries both constraints, consistently with its record
        rec = TrialRecord.from_trial(t)
        assert set(t.constraints) == {"memory", "latency"}
        assert t.constraints["latency"] == pytest.approx(rec.latency_ms - TIGHT_MS)
        if rec.evaluated:
            assert rec.latency_ms <= TIGHT_MS and rec.memory_bytes is not None and t.constraints["memory"] <= 0
        else:
            assert rec.feasible is False and rec.over_budget is not None
    evaluated = [t for t in trials if TrialRecord.from_trial(t).evaluated]
    assert len(evaluated) == 8
    assert any(TrialRecord.from_trial(t).start_point for t in evaluated)
    front = json.loads((run / "pareto.json").read_text())
    assert front["latency_budget"] == {"ms": TIGHT_MS, "spec": f"{TIGHT_MS}ms", "fp32_ms": None, "batch": 16,
                                       "seq": 128, "source": "estimate"}
    assert front["trials"] and all(e["latency_ms_estimate"] <= TIGHT_MS for e in front["trials"])
    baselines = json.loads((run / "baselines.json").read_text())
    assert baselines and all(b["latency_ms"] is not None for b in baselines)
    for b in baselines:  # uniform plans keep every head: all over the latency budget, marked, not evaluated
        assert b["fits"] is False and "latency" in b["over_budget"] and b["heldout_metrics"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["latency_budget"]["ms"] == TIGHT_MS and summary["best_baseline"] is None
    assert "no (latency)" in (run / "report.html").read_text()


def test_without_repair_plans_over_the_latency_budget_are_recorded_not_evaluated(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from slimformer.api import search

    cfg = _config(tiny_model_dir, tmp_path / "run", f"{TIGHT_MS}ms", trials=4, start_points="none",
                  sampler={"name": "random", "seed": 1, "repair": False})
    res = search(write_config(tmp_path / "search.yaml", cfg), progress=False)
    trials = _stored(res.storage)
    over = [t for t in trials if TrialRecord.from_trial(t).over_budget is not None]
    assert over, "random plans over the latency budget were sampled"
    for t in over:
        rec = TrialRecord.from_trial(t)
        assert rec.feasible is False and not rec.evaluated and rec.metrics is None
        assert ("latency" in rec.over_budget) == (t.constraints["latency"] > 0)
        assert ("memory" in rec.over_budget) == (t.constraints["memory"] > 0)
    assert any(TrialRecord.from_trial(t).over_budget == "latency" for t in over)
    evaluated = [t for t in trials if TrialRecord.from_trial(t).evaluated]
    assert len(evaluated) == 4 and all(TrialRecord.from_trial(t).latency_ms <= TIGHT_MS for t in evaluated)
    front = json.loads((res.run_dir / "pareto.json").read_text())["trials"]
    assert {e["trial"] for e in front} <= {t.number for t in evaluated}
    assert res.summary.infeasible_trials == len(over)


def test_mismatch_is_said_once_only_when_latency_matters(tmp_path: Path, tiny_model_dir: Path) -> None:
    prof = load_profile("amd-epyc-avx512-2t-torch").model_dump(mode="json") | {"cpu": "Some Other CPU"}
    prof_path = tmp_path / "other-cpu.yaml"
    prof_path.write_text(yaml.safe_dump(prof, sort_keys=False))
    said: list[str] = []
    base = tiny_config(tiny_model_dir, tmp_path / "run", baselines=False, hardware_profile=str(prof_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would fail here
        prepare(SearchConfig.model_validate(base), log=said.append)  # the latency objective (default objectives)
        assert [m for m in said if "made elsewhere" in m] == [said[0]] and "Some Other CPU" in said[0]
        said.clear()
        prepare(SearchConfig.model_validate(base | {"objectives": ["quality", "memory"]}), log=said.append)
        assert not [m for m in said if "made elsewhere" in m], "latency plays no part: nothing said"
        prepare(SearchConfig.model_validate(base | {"objectives": ["quality", "memory"],
                                                    "budget": {"memory": "40%", "latency": "2x"}}), log=said.append)
        assert len([m for m in said if "made elsewhere" in m]) == 1, "a latency budget alone: said once"
    with warnings.catch_warnings(record=True) as caught:  # no log given: one notice (the CLI's `warning:` line)
        warnings.simplefilter("always")
        prepare(SearchConfig.model_validate(base))
    assert [w.category for w in caught if "made elsewhere" in str(w.message)] == [SlimformerWarning]


def test_measured_search_times_the_fp32_reference_and_the_fastest_plan(tmp_path: Path, tiny_model_dir: Path) -> None:
    measured = {"source": "measured", "batch": 1, "seq": 16, "runs": 3}
    ctx = _ctx(tiny_model_dir, tmp_path, "50x", latency=measured)
    assert ctx.fp32_latency_ms is not None and ctx.fp32_latency_ms > 0
    assert ctx.latency_budget_ms == pytest.approx(50 * ctx.fp32_latency_ms)
    assert ctx.latency_predictor() is not ctx.latency_source(), "repair predicts; trials are measured"
    with pytest.raises(BudgetError, match=r"^budget\.latency 1us is below the fastest plan of the space \(measured "
                                          r"\d+\.\d+ ms at batch 1, seq 16 on this machine\)"):
        _ctx(tiny_model_dir, tmp_path, "1us", latency=measured)
