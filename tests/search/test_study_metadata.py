"""What a run shows Optuna tools: objective names, a small sensitivity pointer (table in the run directory for
SQLite; the whole table in a shared storage), and a Pareto front consistent with `study.best_trials`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from helpers import shared_run as _shared_run

from slimformer.search.records import SENSITIVITY_ATTR, study_sensitivity, write_study_sensitivity
from slimformer.search.results import pareto_trials

TABLE = {"base_quality": 0.9, "base_bytes": 123, "samples": 16, "seconds": 1.5, "base_params": {"a": 4},
         "upgrades": [{"param": "a", "choice": 8, "quality_gain": 0.01, "gain_per_mb": 0.5}]}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory):
    return _shared_run(tmp_path_factory)


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{run / 'study.db'}")


def test_study_has_metric_names(shared_run) -> None:
    _, run, res = shared_run
    study = _study(run)
    assert study.metric_names == [res.summary.quality_metric, "latency_ms", "memory_bytes"]


def test_sqlite_run_keeps_only_a_pointer_to_sensitivity_json(shared_run) -> None:
    _, run, _ = shared_run
    study = _study(run)
    raw = study.user_attrs.get(SENSITIVITY_ATTR)
    if raw is None:
        pytest.skip("this run measured no sensitivity")
    assert set(raw) == {"file", "sha256"} and raw["file"] == "sensitivity.json"
    assert study_sensitivity(study) == json.loads((run / "sensitivity.json").read_text())


def test_front_matches_optuna_best_trials(shared_run) -> None:
    _, run, _ = shared_run
    study = _study(run)
    front = pareto_trials(study, ["quality", "latency", "memory"])
    best = study.best_trials
    assert {t.number for t in front} <= {t.number for t in best}
    params = {repr(sorted(t.params.items())) for t in front}
    assert all(repr(sorted(t.params.items())) in params for t in best), "best_trials only adds duplicate plans"


def test_pointer_round_trip_and_moved_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="s")
    write_study_sensitivity(study, TABLE, run / "sensitivity.json")
    assert study.user_attrs[SENSITIVITY_ATTR]["file"] == "sensitivity.json"
    assert study_sensitivity(study) == TABLE
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    assert study_sensitivity(optuna.load_study(study_name="s", storage=f"sqlite:///{moved / 'study.db'}")) == TABLE
    (moved / "sensitivity.json").write_text(json.dumps({**TABLE, "samples": 99}))
    assert study_sensitivity(optuna.load_study(study_name="s", storage=f"sqlite:///{moved / 'study.db'}")) is None


def test_non_sqlite_storage_keeps_the_whole_table(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s")  # in memory: like a server, not this run directory's file
    write_study_sensitivity(study, TABLE, tmp_path / "sensitivity.json")
    assert study.user_attrs[SENSITIVITY_ATTR] == TABLE and study_sensitivity(study) == TABLE
    assert not (tmp_path / "sensitivity.json").exists()
