"""kill -9 of `slimformer search` at each phase, then the same command again, on the tiny BERT with real processes.

The search is held at a phase by the test hook SLIMFORMER_TEST_PAUSE_AT (search/pause.py), killed there with
SIGKILL, and run again without the hook. The rerun must finish without waiting on the dead driver, keep every
trial the killed run finished (same values), evaluate no plan twice, and hold the start points (and
sensitivity.json): baselines, sensitivity, start-point queueing, mid-trial and output writing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.search.pause import ENV, PHASES
from slimformer.search.records import START_ATTR, TrialRecord, counted_trials
from slimformer.search.runner import default_storage

ENV_BASE = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RERUN_LIMIT_S = 240  # the tiny rerun takes well under a minute; the old stale-claim wait alone was 900 s


def _run_until_paused(cmd: list[str], phase: str, stderr_file: Path) -> None:
    """Start the search held at `phase`, wait for its pause line, kill -9 it."""
    with stderr_file.open("w") as err:
        proc = subprocess.Popen(cmd, env={**ENV_BASE, ENV: phase}, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while f"paused at {phase}" not in stderr_file.read_text():
            assert proc.poll() is None, f"the search ended before {phase}: {stderr_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {phase}: {stderr_file.read_text()[-3000:]}"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_kill_9_at_each_phase_then_the_rerun_finishes_the_same_search(phase: str, tmp_path: Path,
                                                                      tiny_model_dir: Path) -> None:
    requested = 8
    run = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run, trials=requested, sampler={"name": "nsga2", "population_size": 6},
                      baselines=phase == "baselines",  # the baselines only where they are the phase (time)
                      deploy="safetensors")  # tiny model: the ONNX graph's bytes would cut the start points
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    cmd = [sys.executable, "-m", "slimformer.cli", "search", str(cfg_path), "--run-dir", str(run), "--no-progress"]
    _run_until_paused(cmd, phase, tmp_path / "killed.err")
    url = default_storage(run)
    before = {}
    if (run / "study.db").exists() and phase not in ("baselines",):
        before = {t.number: (t.params, t.values) for t in study_trials(url) if t.state == TrialState.COMPLETE}
    if phase in ("trial", "outputs"):
        assert len(before) >= 2, "the kill came after trials had finished"
    baselines_before = json.loads((run / "baselines.json").read_text()) if phase == "baselines" else []

    t0 = time.monotonic()
    again = subprocess.run(cmd, env=ENV_BASE, capture_output=True, text=True, timeout=RERUN_LIMIT_S)
    elapsed = time.monotonic() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert "waiting for" not in again.stderr, again.stderr[-2000:]
    assert elapsed < RERUN_LIMIT_S

    trials = study_trials(url)
    by_number = {t.number: t for t in trials}
    for n, (params, values) in before.items():
        assert by_number[n].state == TrialState.COMPLETE and by_number[n].params == params \
            and by_number[n].values == values, "a trial the killed run finished is kept as it was"
    assert sorted(by_number) == list(range(len(trials)))
    assert all(t.state in FINISHED for t in trials), [(t.number, t.state.name) for t in trials]
    assert counted_trials(trials) == requested
    evaluated = [t for t in trials if TrialRecord.from_trial(t).evaluated]
    plans = [sorted(t.params.items()) for t in evaluated]
    assert len(plans) == len({repr(p) for p in plans}), "no plan evaluated twice"

    study = optuna.load_study(study_name="slimformer", storage=url)
    assert study.user_attrs[START_ATTR]["queued"] is not None
    starts = [t for t in trials if TrialRecord.from_trial(t).start_point is not None]
    assert len(starts) >= 6, "the whole first generation was queued (min(population, trials) start points)"
    assert (run / "sensitivity.json").is_file()
    if phase == "baselines":
        baselines = json.loads((run / "baselines.json").read_text())
        assert baselines_before and baselines[:len(baselines_before)] == baselines_before, \
            "a stored baseline is kept, not evaluated again"
    front = json.loads((run / "pareto.json").read_text())["trials"]
    assert front and {p.name for p in (run / "recipes").glob("*.yaml")} == {f"trial-{e['trial']}.yaml" for e in front}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.is_dir()], "no temp dir left"
