"""`recover_in_search`: the most promising structural plans are distilled briefly on data disjoint from the search
and held-out sets, scored on the search set, added to the study as trials with their recovered score, ranked on
the front by it, and their recipes carry the settings `apply --recover` reproduces them with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import invoke, tiny_config, write_config

from slimformer.api import search
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed
from slimformer.errors import ConfigError
from slimformer.recovery import RecoveryConfig
from slimformer.recovery.config import SearchRecoveryConfig
from slimformer.search.config import SearchConfig
from slimformer.search.context import prepare
from slimformer.search.records import TrialRecord, counted_trials, is_recovered
from slimformer.search.recover_stage import excluded_texts, in_search_batches, promising, recover_in_search
from slimformer.search.results import pareto_trials
from slimformer.search.runner import run_trials

# low rank, int4 and pruned FFNs: structural plans that a short distillation measurably improves on the tiny BERT
# (its pooled output barely moves under compression, so the distillation fits that output alone: mse)
SPACE = {"groups": [{"select": {"role": ["embedding"]}, "rank_fraction": [0.125], "bits": [8]},
                    {"select": {"role": ["query", "key", "value", "attn_out"]}, "rank_fraction": [0.25, 0.5],
                     "bits": [4], "group_size": [8]},
                    {"select": {"role": ["ffn_in", "ffn_out"]}, "neurons_kept": [0.25, 0.5, 1.0], "bits": [4],
                     "group_size": [8]}],
         "per_layer": False}
RECOVER = {"top_k": 2, "steps": 16, "lr": 0.001, "losses": {"mse": 1.0}, "samples": 64, "batch_size": 8}


def _config(model_dir: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return tiny_config(model_dir, run_dir, space=SPACE, trials=6, baselines=False, budget={"memory": "100%"},
                       deploy="safetensors", start_points="random", recover_in_search=RECOVER, **extra)


def test_recovered_scores_are_stored_on_trials_and_rank_the_front(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", _config(tiny_model_dir, tmp_path / "run"))
    res = search(cfg_path, progress=False)
    study = optuna.load_study(study_name="slimformer", storage=f"sqlite:///{res.run_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    added = [t for t in trials if is_recovered(t)]
    assert 1 <= len(added) <= RECOVER["top_k"]
    assert counted_trials(study) == 6  # the recovered copies do not count toward `trials`
    by_number = {t.number: t for t in trials}
    for t in added:
        rec = TrialRecord.from_trial(t)
        src = by_number[rec.recovered_from]
        assert t.params == src.params and rec.recovery_steps == RECOVER["steps"]
        assert rec.unrecovered_metrics == TrialRecord.from_trial(src).metrics
        assert t.values[0] == rec.metrics["cosine"]  # the objective is the recovered search-set score
        assert t.values[1:] == src.values[1:]  # same plan: same latency and memory
    gains = [t.values[0] - by_number[TrialRecord.from_trial(t).recovered_from].values[0] for t in added]
    assert max(gains) > 0, gains  # distillation brings quality back
    front = {t.number for t in pareto_trials(study, ["quality", "latency", "memory"])}
    for t, gain in zip(added, gains):  # the front ranks each plan by its better score: recovered or not
        source = TrialRecord.from_trial(t).recovered_from
        assert source not in front if gain > 0 else t.number not in front
    entries = json.loads((res.run_dir / "pareto.json").read_text())["trials"]
    ctx = prepare(SearchConfig.load(cfg_path))
    recovered_entries = [e for e in entries if "recovered_from" in e]
    assert recovered_entries, "no recovered plan on the front"
    for e in recovered_entries:
        t = by_number[e["trial"]]
        assert e["search_metrics"] == TrialRecord.from_trial(t).metrics
        recipe = Recipe.load(res.run_dir / e["recipe"])
        assert recipe.recovery is not None and recipe.recovery.steps == RECOVER["steps"]
        assert recipe.recovery.settings["steps"] == RECOVER["steps"] and recipe.recovery.settings["lr"] == RECOVER["lr"]
        assert recipe.recovery.settings["data"] != "auto"  # the source it really trained on
        assert recipe.recovery.after == e["heldout_metrics"]
        saved = load_compressed(res.run_dir / "recovered" / f"trial-{e['trial']}")  # the recovered weights, kept
        assert saved.recipe.recovery.settings == recipe.recovery.settings  # type: ignore[attr-defined]
        assert ctx.search_eval.evaluate(saved.model).metrics["cosine"] == pytest.approx(e["search_metrics"]["cosine"],
                                                                                       abs=1e-5)
    best = res.summary.best_recipe
    assert best is not None and best.heldout_quality == max(e["heldout_metrics"]["cosine"] for e in entries)
    # resuming the finished search recovers nothing twice
    search(cfg_path, progress=False)
    again = optuna.load_study(study_name="slimformer", storage=f"sqlite:///{res.run_dir / 'study.db'}")
    assert sum(1 for t in again.get_trials(deepcopy=False) if is_recovered(t)) == len(added)


class _NoHeldout:
    """Stands in for the held-out evaluator while the stage runs: any use of held-out data fails the test."""

    def evaluate(self, *_a: Any, **_k: Any) -> Any:
        raise AssertionError("recover_in_search used the held-out set")


def test_stage_never_touches_heldout_texts(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = SearchConfig.model_validate(_config(tiny_model_dir, tmp_path / "run"))
    ctx = prepare(cfg)
    d = cfg.data
    drawn = ctx.adapter.eval_samples(d.source, d.search_samples, d.heldout_samples, d.calibration_samples, d.seed)
    heldout, searched = set(drawn.heldout.inputs), set(drawn.search.inputs)
    assert heldout <= set(excluded_texts(ctx)) and searched <= set(excluded_texts(ctx))
    source, batches = in_search_batches(ctx, cfg.recover_in_search)  # type: ignore[arg-type]
    trained = ctx.adapter.recovery_samples(source, excluded_texts(ctx), RECOVER["samples"], 0, True)
    assert batches and not (set(trained) & (heldout | searched))
    study = run_trials(ctx, optuna.storages.InMemoryStorage(), "s", 6, None, progress=False)
    ctx.heldout_eval = _NoHeldout()  # type: ignore[assignment]
    models = recover_in_search(ctx, study)
    assert models and all(is_recovered(t) for t in study.get_trials(deepcopy=False) if t.number in models)


def test_promising_spreads_the_structural_front_along_cost(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx = prepare(SearchConfig.model_validate(_config(tiny_model_dir, tmp_path / "run")))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def trial(q: float, lat: float, mem: float, n: int) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(values=[q, lat, mem], params={"x": n / 10}, distributions=dist)
        t.number = n
        return t

    front = [trial(0.9, 10.0, 100.0, 0), trial(0.8, 8.0, 100.0, 1), trial(0.7, 6.0, 100.0, 2),
             trial(0.6, 4.0, 100.0, 3), trial(0.5, 2.0, 100.0, 4)]
    dominated = trial(0.4, 10.0, 100.0, 5)
    picked = promising(ctx, [*front, dominated], 3)
    assert [t.number for t in picked] == [4, 2, 0]  # fastest, middle, best
    assert [t.number for t in promising(ctx, [*front, dominated], 1)] == [0]
    assert [t.number for t in promising(ctx, front[:2], 5)] == [0, 1]


def test_settings_defaults_and_recipe_round_trip(tmp_path: Path) -> None:
    assert SearchRecoveryConfig().steps == 200 and SearchRecoveryConfig().top_k == 4
    assert SearchRecoveryConfig(minutes=2.0).steps is None
    with pytest.raises(ValueError, match="steps or minutes, not both"):
        SearchRecoveryConfig(steps=3, minutes=1.0)
    settings = SearchRecoveryConfig(top_k=3, steps=7, lr=0.002).settings()
    assert "top_k" not in settings and settings["steps"] == 7
    assert RecoveryConfig.from_recorded(settings) == RecoveryConfig(steps=7, lr=0.002)
    assert RecoveryConfig.from_recorded(settings, minutes=1.5) == RecoveryConfig(minutes=1.5, lr=0.002)
    with pytest.raises(ConfigError, match="--recover: lr"):
        RecoveryConfig.from_recorded({**settings, "lr": -1}, "--recover")
    with pytest.raises(ConfigError, match="recover_in_search"):
        SearchConfig.from_yaml(json.dumps({"model": "m", "space": SPACE, "budget": {"memory": "15%"},
                                           "recover_in_search": {"top_k": 0}}))


def test_apply_recover_uses_the_recipes_recorded_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", _config(tiny_model_dir, tmp_path / "run"))
    res = search(cfg_path, progress=False)
    entries = json.loads((res.run_dir / "pareto.json").read_text())["trials"]
    recipe_path = res.run_dir / next(e["recipe"] for e in entries if "recovered_from" in e)
    recipe = Recipe.load(recipe_path)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe  # the recovery settings round-trip
    out = invoke("apply", recipe_path, "--model", tiny_model_dir, "--samples", 8, "--recover")
    assert out.exit_code == 0, out.stderr
    assert f"recovery: {RECOVER['steps']} steps" in out.stdout
    out = invoke("apply", recipe_path, "--model", tiny_model_dir, "--samples", 8, "--recover", "--steps", 2)
    assert out.exit_code == 0 and "recovery: 2 steps" in out.stdout, out.stderr
