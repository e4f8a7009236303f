"""Budget repair (search/repair.py): over-budget proposals are moved down to the budget, the trial's parameters
are the repaired ones, and a search with repair evaluates (almost) only plans that fit."""

from __future__ import annotations

import random
from pathlib import Path

from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.compression.memory import plan_memory
from slimformer.search.config import SearchConfig
from slimformer.search.context import prepare
from slimformer.search.records import TrialRecord, duplicate_trials, is_duplicate
from slimformer.search.repair import repair_params


def _size(ctx, params) -> int:
    return plan_memory(ctx.adapter, ctx.space.plan_from_params(params)).total_bytes


def test_repair_fits_the_budget_moving_only_down(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = SearchConfig.model_validate(tiny_config(tiny_model_dir, tmp_path / "run", baselines=False,
                                                  budget={"memory": "30%"}))
    ctx = prepare(cfg)
    order = ctx.space.choice_costs()
    rng = random.Random(0)
    repaired = 0
    for _ in range(20):
        params = {n: rng.choice(c) for n, c in order.items()}
        fixed, steps = repair_params(ctx, params, order, {})
        assert _size(ctx, fixed) <= ctx.budget_bytes
        assert all(order[n].index(fixed[n]) <= order[n].index(params[n]) for n in order), "only cheaper choices"
        if _size(ctx, params) <= ctx.budget_bytes:
            assert (fixed, steps) == (params, 0), "a plan that fits is left alone"
        else:
            repaired += 1
            assert steps >= 1
    assert repaired >= 3
    # measured gains steer the repair: the parameter whose upgrade is worth most is downgraded last
    top = {n: c[-1] for n, c in order.items()}
    keep = next(n for n in order if n.endswith(".bits"))
    gains = {(keep, order[keep][-1]): 1.0}
    fixed, _ = repair_params(ctx, top, order, gains)
    assert fixed[keep] == order[keep][-1] or all(fixed[n] == order[n][0] for n in order if n != keep)


def test_search_with_repair_evaluates_plans_that_fit(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", trials=12, baselines=False, budget={"memory": "18%"},
                      sampler={"name": "nsga2", "population_size": 4, "repair": True}, start_points="none",
                      deploy="safetensors")  # 18% is just above the packed cheapest plan; the ONNX graph adds ~1.5%
    res = search(write_config(tmp_path / "search.yaml", cfg), progress=False)
    trials = study_trials(res.storage)
    # repaired plans often coincide (16 plans fit): a plan sampled again is answered from the study (PRUNED)
    sampled = [t for t in trials if "start_point" not in t.user_attrs and not is_duplicate(t)]
    assert len(sampled) == 12 and all(t.user_attrs.get("feasible") is True for t in sampled), "no over-budget samples"
    assert any(TrialRecord.from_trial(t).repaired_steps for t in sampled)
    assert res.summary.infeasible_trials == 0 and len(trials) - duplicate_trials(trials) == 12
    assert all(t.state == TrialState.COMPLETE for t in trials if not is_duplicate(t))
    assert len({repr(sorted(t.params.items())) for t in sampled}) == 12, "12 distinct plans evaluated"
    for t in sampled:  # the stored parameters are the evaluated (repaired) plan
        assert t.user_attrs["memory_bytes"] <= res.summary.budget_bytes
