"""End-to-end searches on the tiny BERT: run directory, Pareto front, resume, interruption, storage."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import apply_recipe, export_recipe, search
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.recipe import Recipe
from slimformer.errors import BudgetError, ConfigError
from slimformer.models import load
from slimformer.search.config import SearchConfig
from slimformer.search.records import counted_trials, duplicate_trials
from slimformer.search.results import ParetoFront, SearchSummary
from slimformer.search.runner import default_storage

RUN_FILES = ("config.yaml", "study.db", "baselines.json", "pareto.json", "pareto.png", "report.html", "splits.json",
             "summary.json")
INTERRUPTED = "interrupted (driver stopped)"


def _numbers(trials: list) -> list[int]:
    return sorted(t.number for t in trials)


def _count(trials: list, *states: TrialState) -> int:
    return sum(1 for t in trials if t.state in states)


# ------------------------------------------------------------------------------------ run directory


def test_run_directory_holds_every_output(shared_run) -> None:
    cfg_path, run_dir, result = shared_run
    assert result.run_dir == run_dir
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (run_dir / "report.html").read_text().lower()
    assert SearchConfig.load(run_dir / "config.yaml") == SearchConfig.load(cfg_path)
    assert result.storage == default_storage(run_dir)

    trials = study_trials(result.storage)
    assert len(trials) == 8 and _numbers(trials) == list(range(8))
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == result.summary.to_json(), "summary.json is the returned summary"
    assert SearchSummary.from_json(summary) == result.summary
    assert sum(summary["trial_states"].values()) == 8
    assert summary["quality_metric"] == "cosine"
    assert summary["best_recipe"] is not None
    assert (run_dir / summary["best_recipe"]["recipe"]).is_file()


def test_splits_json_records_three_disjoint_sets(shared_run) -> None:
    """Calibration samples never score a trial: splits.json fingerprints three disjoint sets of the sizes asked."""
    from slimformer.data import text_sets
    from slimformer.search.rundir import sample_fingerprint

    _, run_dir, _ = shared_run
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["disjoint"] is True and splits["source"] == "fortunes"
    assert splits["sizes"] == {"calibration": 8, "search": 16, "heldout": 16}
    prints = {k: set(v) for k, v in splits["samples"].items()}
    assert not (prints["calibration"] & prints["search"] or prints["calibration"] & prints["heldout"]
                or prints["search"] & prints["heldout"])
    expected = text_sets("fortunes", 8, 16, 16, seed=0)
    assert prints["calibration"] == {sample_fingerprint(t) for t in expected.calibration}
    assert prints["heldout"] == {sample_fingerprint(t) for t in expected.heldout}


def test_pareto_json_entries_have_heldout_metrics_and_recipes(shared_run) -> None:
    _, run_dir, result = shared_run
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert pareto["objectives"] == ["quality", "latency", "memory"]
    entries = pareto["trials"]
    assert entries, "at least one feasible Pareto trial"
    assert ParetoFront.from_json(pareto).to_json() == pareto, "the typed front reads and writes the file's schema"
    for e in entries:
        assert set(e["heldout_metrics"]) >= {"cosine"}
        assert -1.0 <= e["heldout_metrics"]["cosine"] <= 1.0 + 1e-6
        assert e["memory_bytes"] <= pareto["budget_bytes"]
        assert e["recipe"] == f"recipes/trial-{e['trial']}.yaml"
    recipe_files = {p.name for p in (run_dir / "recipes").glob("*.yaml")}
    assert recipe_files == {f"trial-{e['trial']}.yaml" for e in entries}
    by_number = {t.number: t for t in study_trials(result.storage)}
    for e in entries:
        t = by_number[e["trial"]]
        assert t.state == TrialState.COMPLETE and t.user_attrs["feasible"] is True
        assert e["params"] == t.params


def test_baselines_json(shared_run) -> None:
    _, run_dir, _ = shared_run
    baselines = json.loads((run_dir / "baselines.json").read_text())
    names = [b["name"] for b in baselines]
    assert "uniform-int8" in names and "uniform-int4-g16" in names and "uniform-int4-g32" in names
    for b in baselines:
        if b["fits"]:
            assert b["heldout_metrics"] and "cosine" in b["heldout_metrics"]
            assert b["memory_percent"] <= 40.0
        else:
            assert b["heldout_metrics"] is None


def test_every_recipe_loads_and_applies_to_the_model(shared_run, tiny_model_dir: Path) -> None:
    _, run_dir, _ = shared_run
    entries = json.loads((run_dir / "pareto.json").read_text())["trials"]
    adapter = load(str(tiny_model_dir))
    for e in entries:
        rec = Recipe.load(run_dir / e["recipe"])
        assert rec.provenance.trial == e["trial"]
        assert rec.model.sha256 == adapter.weights_sha256()
        plan = rec.to_plan(adapter)
        assert not plan.is_identity
        res = apply_recipe(rec, str(tiny_model_dir), samples=8, calibration=8)
        assert res.memory.total_bytes == e["memory_bytes"]
        assert res.fidelity["cosine"] > 0.5


def test_infeasible_trials_never_reach_the_pareto_front(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 25% of fp32: 8-bit embeddings (~29% of the model) are over budget, 4-bit embeddings fit.
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", budget={"memory": "25%"}, trials=6, baselines=False)
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    url = default_storage(tmp_path / "run")
    (tmp_path / "run").mkdir()
    study = optuna.create_study(storage=url, study_name="slimformer",
                                directions=["maximize", "minimize", "minimize"])
    over = {"g0.emb.bits": 8, "g0.emb.group_size": 16, "g1.L0.bits": 8, "g1.L0.rank_fraction": 1.0,
            "g1.L1.bits": 8, "g1.L1.rank_fraction": 1.0}
    study.enqueue_trial(over)
    study.enqueue_trial({**over, "g1.L0.bits": 4, "g1.L1.bits": 4, "g1.L0.rank_fraction": 0.5})
    study.enqueue_trial({**over, "g0.emb.bits": 4})  # the same layers with 4-bit embeddings: fits

    result = search(cfg_path, progress=False)
    trials = study_trials(url)
    infeasible = {t.number for t in trials if t.user_attrs.get("feasible") is False}
    assert {0, 1} <= infeasible
    assert 2 not in infeasible
    assert result.summary.infeasible_trials == len(infeasible)
    for t in trials:
        if t.number in infeasible:
            assert "metrics" not in t.user_attrs, "infeasible plans are not evaluated"
            assert t.user_attrs["memory_bytes"] > result.summary.budget_bytes
    front = {e["trial"] for e in json.loads((tmp_path / "run" / "pareto.json").read_text())["trials"]}
    assert front and not (front & infeasible)
    recipes = {p.name for p in (tmp_path / "run" / "recipes").glob("*.yaml")}
    assert not recipes & {f"trial-{n}.yaml" for n in infeasible}
    with pytest.raises(ConfigError, match="over the memory budget"):
        export_recipe(tmp_path / "run", 0)


# ------------------------------------------------------------------------------------------ resume


def test_resume_keeps_trials_and_tops_up_to_the_requested_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run",
                                                                  baselines=False))
    url = default_storage(tmp_path / "run")
    search(cfg_path, progress=False)
    first = study_trials(url)
    assert len(first) == 8 and _numbers(first) == list(range(8))

    search(cfg_path, progress=False)  # same count: nothing new
    again = study_trials(url)
    assert len(again) == 8 and _numbers(again) == list(range(8))
    assert [(t.number, t.params, t.values) for t in again] == [(t.number, t.params, t.values) for t in first]

    res = search(cfg_path, progress=False, trials=12)
    more = study_trials(url)
    dups = duplicate_trials(more)  # plans sampled again: answered from the study, PRUNED, not counted
    assert len(more) == 12 + dups and _numbers(more) == list(range(12 + dups))
    assert _count(more, TrialState.COMPLETE, TrialState.FAIL) == 12 and counted_trials(more) == 12
    assert sum(res.summary.trial_states.values()) == 12 + dups and res.summary.duplicate_trials == dups
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trials"] == 12


def test_fewer_trials_than_start_points_leaves_no_waiting_trials(tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=2,
                                                                  baselines=False))
    res = search(cfg_path, progress=False)
    trials = study_trials(default_storage(tmp_path / "run"))
    assert res.summary.trial_states == {"COMPLETE": 2}, res.summary.trial_states
    assert len(trials) == 2


def test_interrupted_trial_is_failed_and_replaced(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=4,
                                                                  baselines=False))
    url = default_storage(tmp_path / "run")
    search(cfg_path, progress=False)
    # A driver that died mid-trial leaves a RUNNING trial in the storage.
    study = optuna.load_study(study_name="slimformer", storage=url)
    orphan = study.ask()
    assert orphan.number == 4
    assert _count(study_trials(url), TrialState.RUNNING) == 1

    search(cfg_path, progress=False, trials=6)
    trials = study_trials(url)
    by_number = {t.number: t for t in trials}
    assert by_number[4].state == TrialState.FAIL
    assert by_number[4].user_attrs["fail_reason"] == INTERRUPTED
    assert _count(trials, TrialState.RUNNING, TrialState.WAITING) == 0
    real = [t for t in trials if t.user_attrs.get("fail_reason") != INTERRUPTED]
    assert _count(real, TrialState.COMPLETE, TrialState.FAIL) == 6  # the requested number of real trials
    assert _count(trials, TrialState.COMPLETE, TrialState.FAIL) == 7  # plus the interrupted one
    assert _numbers(trials) == list(range(7))


def test_rerun_with_a_different_budget_is_refused(tmp_path: Path, shared_run) -> None:
    cfg_path, run_dir, result = shared_run
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "pareto.json", "summary.json")}
    n_before = len(study_trials(result.storage))
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["budget"] = {"memory": "35%"}
    other = write_config(tmp_path / "other-budget.yaml", cfg)
    with pytest.raises(ConfigError, match="different budget"):
        search(other, progress=False)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert len(study_trials(result.storage)) == n_before


def test_refused_new_run_dir_is_not_left_behind(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml",
                            tiny_config(tiny_model_dir, tmp_path / "run", budget={"memory": "1%"}))
    with pytest.raises(BudgetError, match="budget.memory"):
        search(cfg_path, progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- storage


def test_any_optuna_storage_url(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    url = f"sqlite:///{other}"
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=4,
                                                                  baselines=False))
    res = search(cfg_path, progress=False, storage=url)
    assert res.storage == url
    assert other.is_file()
    assert not (tmp_path / "run" / "study.db").exists()
    assert [s.study_name for s in optuna.get_all_study_summaries(storage=url)] == ["slimformer"]
    assert len(study_trials(url)) == 4
    assert SearchConfig.load(tmp_path / "run" / "config.yaml").storage == url
    # The run directory remembers its storage: exporting a recipe reads the study from there.
    front = json.loads((tmp_path / "run" / "pareto.json").read_text())["trials"]
    rec = export_recipe(tmp_path / "run", front[0]["trial"])
    assert rec.provenance.storage == url
    assert isinstance(rec.to_plan(load(str(tiny_model_dir))), CompressionPlan)
