"""`--backend ray`: workers sharing one study give the run directory of a local run; option checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.errors import ConfigError
from slimformer.search.records import counted_trials
from slimformer.search.storage import WORKER_ATTR, default_url

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed: pip install 'slimformer[ray]'")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _form(run_dir: Path) -> set[str]:
    pareto = json.loads((run_dir / "pareto.json").read_text())["trials"]
    assert pareto
    assert {p.name for p in (run_dir / "recipes").glob("*.yaml")} == {f"trial-{e['trial']}.yaml" for e in pareto}
    return {p.name for p in run_dir.iterdir()}


@needs_ray
def test_two_ray_workers_give_the_run_directory_of_a_local_run(tmp_path: Path, tiny_model_dir: Path,
                                                               shared_run) -> None:
    requested = 12
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=requested))
    lines: list[str] = []
    res = search(cfg_path, progress=False, backend="ray", workers=2, log=lines.append)
    assert any("ray: 2 worker(s) x 1 torch thread(s)" in ln for ln in lines), lines
    assert res.storage == default_url(tmp_path / "run")
    assert _form(tmp_path / "run") == _form(shared_run[1]), "same files as a local run (study.db included)"
    trials = study_trials(res.storage)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t._trial_id for t in trials}) == len(trials)
    assert all(t.state in FINISHED for t in trials)
    assert counted_trials(trials) == requested
    workers = {t.system_attrs.get(WORKER_ATTR) for t in trials if t.user_attrs.get("feasible") is not None}
    assert None not in workers and 1 <= len(workers) <= 2
    assert sum(res.summary.trial_states.values()) == len(trials)

    more = search(cfg_path, progress=False, trials=requested + 2)  # a local run resumes a Ray run's study
    assert counted_trials(study_trials(more.storage)) == requested + 2


def test_backend_options_are_checked_before_anything_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ConfigError, match="--address and --workers apply to --backend ray"):
        search(cfg_path, progress=False, workers=2)
    with pytest.raises(ConfigError, match="--backend 'dask'"):
        search(cfg_path, progress=False, backend="dask")
    if importlib.util.find_spec("ray") is not None:
        with pytest.raises(ConfigError, match="--address ray://head:10001: workers on other machines cannot share"):
            search(cfg_path, progress=False, backend="ray", address="ray://head:10001")
        with pytest.raises(ConfigError, match="cannot share sqlite:///x.db"):
            search(cfg_path, progress=False, backend="ray", address="ray://head:10001", storage="sqlite:///x.db")
    assert not (tmp_path / "run").exists()
