"""Multi-fidelity (search/multifidelity.py): slice-then-rest scoring equals full scoring, the pruning rule, and PRUNED
trials in a real tiny search (counted, listed in the summary, never on the front, resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import study_trials, tiny_config, write_config
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from slimformer.api import search
from slimformer.errors import ConfigError
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.search.config import SearchConfig
from slimformer.search.multifidelity import dominating_trial, slice_noise
from slimformer.search.records import TrialRecord, counted_trials, is_duplicate

OBJECTIVES = ["quality", "latency", "memory"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def test_slice_then_rest_scores_exactly_like_the_whole_set(tiny_bert, batches) -> None:
    ev = FidelityEvaluator(tiny_bert, batches(tiny_bert, n=24, batch_size=8))
    model = tiny_bert.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head = ev.outputs(model, 0, 1)
    assert head.shape[0] == 8
    whole = ev.score(torch.cat([head, ev.outputs(model, 1, None)]))
    assert whole.metrics == ev.evaluate(model).metrics
    assert whole.n_samples == 24 and ev.score(head).n_samples == 8


def _done(number: int, q: float, lat: float, mem: float, slice_q: float | None, feasible: bool = True):
    attrs = TrialRecord(feasible=feasible, slice_quality=slice_q).to_user_attrs()
    t = create_trial(values=[q, lat, mem], params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)},
                     user_attrs=attrs)
    t.number = number
    return t


def test_noise_and_domination_rule() -> None:
    trials = [_done(0, 0.95, 10.0, 100.0, 0.96), _done(1, 0.97, 10.0, 120.0, 0.975),
              _done(2, 0.99, 9.0, 90.0, None),  # no slice recorded: not in the noise model
              _done(3, 0.999, 1.0, 1.0, 0.5, feasible=False)]  # over budget: never counts
    noise = slice_noise(trials, 0)
    assert noise is not None and noise.n == 2
    assert noise.mean == pytest.approx(-0.0075) and noise.max == pytest.approx(-0.005)
    assert noise.allowance(0.0) == pytest.approx(-0.005) and noise.allowance(3.0) > noise.max
    # a candidate at 100 bytes / 10 ms: trials 0 and 2 need no more; the best of them above the bound wins
    assert dominating_trial(trials, OBJECTIVES, {"latency": 10.0, "memory": 100.0}, 0.94).number == 2
    assert dominating_trial(trials, OBJECTIVES, {"latency": 10.0, "memory": 95.0}, 0.94).number == 2  # 0 needs more
    assert dominating_trial(trials, OBJECTIVES, {"latency": 10.0, "memory": 85.0}, 0.5) is None
    assert dominating_trial(trials, OBJECTIVES, {"latency": 10.0, "memory": 100.0}, 0.995) is None
    assert slice_noise(trials[:1], 0) is None


def test_multi_fidelity_config_is_validated() -> None:
    base = {"model": "m", "space": {"groups": [{"select": {"role": ["query"]}, "bits": [8, 4]}]},
            "budget": {"memory": "50%"}}
    cfg = SearchConfig.model_validate(base | {"multi_fidelity": {"enabled": True, "slice": 0.5}})
    assert cfg.multi_fidelity.enabled and cfg.multi_fidelity.margin == 3.0
    with pytest.raises(ConfigError, match="multi_fidelity"):
        SearchConfig.from_yaml(json.dumps(base | {"multi_fidelity": {"slice": 0}}))
    with pytest.raises(ConfigError, match="multi_fidelity"):
        SearchConfig.from_yaml(json.dumps(base | {"multi_fidelity": {"enabled": True, "halving": 2}}))


def test_pruned_trials_count_are_summarised_and_never_reach_the_front(tmp_path: Path, tiny_model_dir: Path) -> None:
    mf = {"enabled": True, "slice": 0.25, "margin": 0.0, "min_observations": 2}
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", trials=14, baselines=False, multi_fidelity=mf,
                      data={"search_samples": 32, "heldout_samples": 16, "calibration_samples": 8, "batch_size": 8,
                            "max_length": 32})
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    res = search(cfg_path, progress=False)
    trials = study_trials(res.storage)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and not is_duplicate(t)]  # duplicates: PRUNED too
    assert pruned, "margin 0 on a random tiny model prunes some plans"
    assert counted_trials(trials) == 14 and all(t.state in FINISHED for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert res.summary.pruned_trials == len(pruned) == res.summary.trial_states["PRUNED"] - res.summary.duplicate_trials
    front = {e["trial"] for e in json.loads((tmp_path / "run" / "pareto.json").read_text())["trials"]}
    assert front and not front & {t.number for t in pruned}
    by_number = {t.number: t for t in trials}
    for t in pruned:
        reason = t.user_attrs["pruned_reason"]
        winner = by_number[int(reason.split("of trial ")[1].split(",")[0])]
        assert winner.state == TrialState.COMPLETE and winner.values[0] > TrialRecord.from_trial(t).slice_quality
        assert winner.values[2] <= t.user_attrs["memory_bytes"] and winner.values[1] <= t.user_attrs["latency_ms"]
    full = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible")]
    assert all(TrialRecord.from_trial(t).slice_quality is not None for t in full)

    more = search(cfg_path, progress=False, trials=18)  # resume keeps pruned trials counted
    assert counted_trials(study_trials(more.storage)) == 18

