"""Resilience of `slimformer search` on the tiny BERT, with real processes:

(a) kill -9 of the driver mid-trial, then the same command again: finished trials are kept, the trial the
    driver was running becomes FAIL with a reason, the counted total reaches the requested count;
(b) a trial whose compressed model produces NaN/inf (a real overflow: an fp16 choice for a weight beyond
    fp16's range) becomes FAIL with the reason recorded, and the search goes on;
(c) two `slimformer search` processes on one PostgreSQL (and one journal-file) storage and study: no trial
    lost or duplicated, the study's count is exact, and both write a run directory like a local run's.

PostgreSQL cases need SLIMFORMER_TEST_PG_URL (`bash scripts/ci-services.sh`; .ci/run exports it).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from helpers import LINEAR_ROLES, build_tiny_model, study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.search.records import INTERRUPTED, counted_trials, duplicate_trials
from slimformer.search.runner import default_storage

PG_URL = os.environ.get("SLIMFORMER_TEST_PG_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="SLIMFORMER_TEST_PG_URL is not set: run `export "
                              "SLIMFORMER_TEST_PG_URL=$(bash scripts/ci-services.sh)` to start a local PostgreSQL "
                              "(CI always does)")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def slimformer(*args: object) -> list[str]:
    return [sys.executable, "-m", "slimformer.cli", *[str(a) for a in args]]


def assert_whole_study(trials: list, requested: int) -> None:
    """Contiguous numbers, distinct trials, every one finished, exactly `requested` counted."""
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t._trial_id for t in trials}) == len(trials)
    assert all(t.state in FINISHED for t in trials), [(t.number, t.state.name) for t in trials]
    assert counted_trials(trials) == requested


def run_dir_form(run_dir: Path) -> set[str]:
    """The names a run directory holds (recipes as a pattern), leaving out the study file."""
    names = {p.name for p in run_dir.iterdir()} - {"study.db"}
    pareto = json.loads((run_dir / "pareto.json").read_text())["trials"]
    recipes = {p.name for p in (run_dir / "recipes").glob("*.yaml")}
    assert recipes == {f"trial-{e['trial']}.yaml" for e in pareto}, "a recipe for every Pareto trial, no other"
    assert pareto, "a feasible Pareto front"
    return names


# --------------------------------------------------------------------------------------- (a) kill -9


def _states(db: Path) -> dict[int, str]:
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=5)  # a reader of the driver's WAL-mode file; it writes nothing
    try:
        return dict(con.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        con.close()


def test_killed_driver_resumes_with_finished_trials_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    requested = 10
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", trials=requested, baselines=False, start_points="random")
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    db = tmp_path / "run" / "study.db"
    cmd = slimformer("search", cfg_path, "--run-dir", tmp_path / "run", "--no-progress")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_running = None
    deadline = time.monotonic() + 120
    try:
        while killed_running is None:
            assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no trial completed in time"
            states = _states(db)
            if sum(s == "COMPLETE" for s in states.values()) >= 2 and "RUNNING" in states.values():
                os.kill(proc.pid, signal.SIGSTOP)  # freeze it, then kill it only in the middle of a trial
                running = [n for n, s in _states(db).items() if s == "RUNNING"]
                if running:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_running = running
                else:
                    os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_running is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    url = default_storage(tmp_path / "run")
    before = {t.number: t.values for t in study_trials(url) if t.state == TrialState.COMPLETE}
    assert len(before) >= 2

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study_trials(url)
    by_number = {t.number: t for t in trials}
    for n, values in before.items():
        assert by_number[n].state == TrialState.COMPLETE and by_number[n].values == values, "finished trials kept"
    for n in killed_running:
        assert by_number[n].state == TrialState.FAIL
        assert by_number[n].user_attrs["fail_reason"] == INTERRUPTED
    assert_whole_study(trials, requested)
    assert len(trials) == requested + len(killed_running) + sum(
        1 for t in trials if t.user_attrs.get("feasible") is False) + duplicate_trials(trials)
    assert (tmp_path / "run" / "pareto.json").is_file()


# ------------------------------------------------------------------------------- (b) a failing trial


@pytest.fixture(scope="module")
def overflow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with one value-projection weight of 1e6: finite in fp32 (and in int8 with its scale),
    +inf once stored as fp16, so every plan with fp16 for that unit gives NaN/inf outputs."""
    import torch
    from transformers import BertModel

    model_dir = build_tiny_model(tmp_path_factory.mktemp("overflow-bert"))
    model = BertModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.value.weight[0, 0] = 1e6
    model.save_pretrained(model_dir)
    return model_dir


def overflow_config(model_dir: Path, run_dir: Path, **overrides: object) -> dict:
    others = [r for r in LINEAR_ROLES if r != "value"]
    return tiny_config(model_dir, run_dir, baselines=False, space={"groups": [
        {"select": {"role": ["embedding"]}, "bits": [8, 4], "group_size": [16]},
        {"select": {"role": ["value"], "layers": "0"}, "bits": [16, 8]},  # parameter g1.L0.bits
        {"select": {"role": ["value"], "layers": "1"}, "bits": [8, 4]},
        {"select": {"role": others}, "bits": [8, 4]},
    ]}, **overrides)


def test_a_trial_producing_nan_fails_with_its_reason_and_the_search_goes_on(tmp_path: Path,
                                                                          overflow_model_dir: Path) -> None:
    cfg = overflow_config(overflow_model_dir, tmp_path / "run", trials=6, start_points="random")
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    url = default_storage(tmp_path / "run")
    (tmp_path / "run").mkdir()
    study = optuna.create_study(storage=url, study_name="slimformer", directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial({"g1.L0.bits": 16})  # the overflowing choice first, then whatever the sampler picks
    study.enqueue_trial({"g1.L0.bits": 8})

    res = search(cfg_path, progress=False)
    trials = study_trials(url)
    by_number = {t.number: t for t in trials}
    assert by_number[0].params["g1.L0.bits"] == 16
    assert by_number[0].state == TrialState.FAIL
    assert by_number[0].user_attrs["fail_reason"] == "FloatingPointError: compressed model produced NaN/inf outputs"
    assert by_number[1].state == TrialState.COMPLETE, "the search goes on"
    assert all(t.state == TrialState.FAIL for t in trials if t.params.get("g1.L0.bits") == 16)
    assert_whole_study(trials, 6)
    assert res.summary.trial_states["FAIL"] >= 1
    front = json.loads((tmp_path / "run" / "pareto.json").read_text())["trials"]
    assert front and 0 not in {e["trial"] for e in front}


def test_a_failing_plan_in_the_sensitivity_phase_does_not_stop_the_search(tmp_path: Path,
                                                                          overflow_model_dir: Path) -> None:
    # the sensitivity phase measures the upgrade g1.L0.bits 8 -> 16, whose outputs are NaN
    cfg_path = write_config(tmp_path / "search.yaml", overflow_config(overflow_model_dir, tmp_path / "run", trials=4))
    lines: list[str] = []
    search(cfg_path, progress=False, log=lines.append)
    assert any("sensitivity measurement failed (FloatingPointError" in ln for ln in lines), lines
    trials = study_trials(default_storage(tmp_path / "run"))
    assert_whole_study(trials, 4)
    assert any(t.user_attrs.get("start_point") == "uniform" for t in trials), "uniform start points still queued"


# --------------------------------------------------------------------- (c) two processes, one study


@pytest.mark.parametrize("kind", [pytest.param("postgresql", marks=needs_pg), "journal"])
def test_two_processes_share_one_study(kind: str, tmp_path: Path, tiny_model_dir: Path, shared_run) -> None:
    requested = 10
    name = f"pair-{uuid.uuid4().hex[:10]}"
    url = PG_URL if kind == "postgresql" else f"journal:{tmp_path / 'study.log'}"
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "unused",
                                                                 trials=requested, study_name=name))
    procs = [subprocess.Popen(slimformer("search", cfg_path, "--run-dir", tmp_path / f"run{i}", "--storage", url,
                                         "--no-progress"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    storage = url if kind == "postgresql" else optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log")))
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        assert_whole_study(trials, requested)
        assert not any(t.state == TrialState.FAIL and not str(t.user_attrs.get("fail_reason", "")).startswith(
            "interrupted (surplus") for t in trials), "no trial failed except surplus ones"
    finally:
        if kind == "postgresql":
            optuna.delete_study(study_name=name, storage=url)
    local_form = run_dir_form(shared_run[1])
    fronts = []
    for i in range(2):
        rd = tmp_path / f"run{i}"
        assert run_dir_form(rd) == local_form
        fronts.append([e["trial"] for e in json.loads((rd / "pareto.json").read_text())["trials"]])
        summary = json.loads((rd / "summary.json").read_text())
        assert sum(summary["trial_states"].values()) == len(trials)
    assert fronts[0] == fronts[1], "both processes report the same study"
