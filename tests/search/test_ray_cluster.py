"""`--backend ray --address`: a real Ray head started by the test (`ray start --head` on 127.0.0.1), two workers
joining it on one PostgreSQL study, multi-fidelity on. The run directory has the form of a local run's, trial
numbers are contiguous and every trial ends COMPLETE, PRUNED or FAIL.

Needs SLIMFORMER_TEST_PG_URL (`bash scripts/ci-services.sh`; .ci/run exports it) and skips without it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.search.records import counted_trials, is_duplicate
from slimformer.search.storage import WORKER_ATTR

PG_URL = os.environ.get("SLIMFORMER_TEST_PG_URL")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed: pip install "
                       "'slimformer[ray]'"),
    pytest.mark.skipif(not PG_URL, reason="SLIMFORMER_TEST_PG_URL is not set: workers joining a Ray cluster need a "
                       "database server; run `export SLIMFORMER_TEST_PG_URL=$(bash scripts/ci-services.sh)` (CI does)"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used",
                               "ignore::optuna.exceptions.ExperimentalWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with 2 CPUs in its own session directory; stopped (its process group) after.
    Token authentication on, with Ray's default token file (~/.ray/auth_token, created by whichever side needs it
    first), because Ray caches the token per process: a local ray.init earlier in this process loaded that file."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                             "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail("ray start --head did not listen within 60 s")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)  # the head and every Ray process it started (its own group)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:  # `ray start --block` takes ~15 s to stop gracefully; nothing to keep
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_workers_joining_a_ray_head_on_postgresql(tmp_path: Path, tiny_model_dir: Path, shared_run,
                                                      ray_head: str) -> None:
    requested = 8
    study = f"cluster-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", trials=requested, study_name=study,
                      multi_fidelity={"enabled": True, "margin": 0.0, "min_observations": 2},
                      data={"search_samples": 32, "heldout_samples": 16, "calibration_samples": 8, "batch_size": 8,
                            "max_length": 32})
    lines: list[str] = []
    res = search(write_config(tmp_path / "search.yaml", cfg), progress=False, backend="ray", address=ray_head,
                 workers=2, storage=PG_URL, log=lines.append)
    assert any("ray: 2 worker(s) x 1 torch thread(s) on 2 CPU(s)" in ln for ln in lines), lines

    def form(run_dir: Path) -> set[str]:
        return {p.name for p in run_dir.iterdir()} - {"study.db"}  # the study lives in PostgreSQL here

    assert form(tmp_path / "run") == form(shared_run[1])
    trials = study_trials(PG_URL, study)  # type: ignore[arg-type]
    assert sorted(t.number for t in trials) == list(range(len(trials))), "contiguous, none lost or duplicated"
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    assert counted_trials(trials) == requested
    assert res.summary.pruned_trials == sum(1 for t in trials if t.state == TrialState.PRUNED and not is_duplicate(t))
    workers = {t.system_attrs.get(WORKER_ATTR) for t in trials if t.user_attrs.get("feasible") is not None}
    assert None not in workers and all(not w.endswith(f":{os.getpid()}") for w in workers), "ran in Ray workers"
