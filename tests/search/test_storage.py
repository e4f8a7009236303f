"""Storages (search/storage.py) and the multi-driver parts of the runner: URL validation, heartbeats and
retry of a dead worker's trial, start points once per study, the study-wide trial count.

PostgreSQL cases need SLIMFORMER_TEST_PG_URL (`bash scripts/ci-services.sh` starts a server and prints it;
.ci/run exports it) and skip without it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from helpers import tiny_config, write_config
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.errors import ConfigError
from slimformer.search.config import SearchConfig
from slimformer.search.context import prepare
from slimformer.search.records import (
    STALE,
    START_ATTR,
    SURPLUS,
    StartClaim,
    TrialRecord,
    counted_trials,
    duplicate_trials,
    start_claim,
    study_sensitivity,
    write_start_claim,
)
from slimformer.search.results import pareto_trials
from slimformer.search.runner import (
    START_STALE_S,
    default_storage,
    ensure_start_points,
    make_objective,
    open_study,
    trial_loop,
)
from slimformer.search.storage import (
    GRACE_PERIOD,
    HEARTBEAT_ATTR,
    HEARTBEAT_INTERVAL,
    WORKER_ATTR,
    HeartbeatRDBStorage,
    RetryStaleTrial,
    fail_stale_trials,
    lock_run_dir,
    make_storage,
    open_storage,
    unlock_run_dir,
)

PG_URL = os.environ.get("SLIMFORMER_TEST_PG_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="SLIMFORMER_TEST_PG_URL is not set: run `export "
                              "SLIMFORMER_TEST_PG_URL=$(bash scripts/ci-services.sh)` to start a local PostgreSQL "
                              "(CI always does)")
DIRECTIONS = ["maximize", "minimize", "minimize"]
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used",
                                        "ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(scope="module")
def tiny_ctx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A prepared tiny search context (nothing is written by prepare)."""
    cfg = SearchConfig.model_validate(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("ctx") / "run",
                                                  baselines=False))
    return prepare(cfg)


def _study(storage, name: str | None = None) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=name or f"t-{uuid.uuid4().hex[:10]}",
                               directions=DIRECTIONS, load_if_exists=True)


# ------------------------------------------------------------------------------------------- make_storage


def test_default_storage_is_the_run_dirs_sqlite_file_and_exclusive(tmp_path: Path) -> None:
    storage, url, exclusive = make_storage(None, tmp_path / "run")
    assert isinstance(storage, RDBStorage)
    assert url == default_storage(tmp_path / "run") == f"sqlite:///{(tmp_path / 'run' / 'study.db').resolve()}"
    assert exclusive is True
    assert storage.get_heartbeat_interval() is None, "one driver: interrupted trials are failed on resume instead"
    assert (tmp_path / "run" / "study.db").is_file()


def test_an_rdb_url_is_shared_with_heartbeat_and_retry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storage, canonical, exclusive = make_storage(url, tmp_path / "run")
    assert canonical == url and exclusive is False
    assert isinstance(storage, HeartbeatRDBStorage)
    assert storage.get_heartbeat_interval() == HEARTBEAT_INTERVAL
    assert storage.grace_period == GRACE_PERIOD
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), RetryStaleTrial)
    assert not (tmp_path / "run").exists(), "a shared storage writes nothing into the run directory"


def test_journal_url_opens_a_journal_file_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage, canonical, exclusive = make_storage("journal:study.log", tmp_path / "run")
    assert isinstance(storage, JournalStorage)
    assert canonical == f"journal:{(tmp_path / 'study.log').resolve()}" and exclusive is False
    assert storage.get_heartbeat_interval() == HEARTBEAT_INTERVAL
    study = _study(storage, "j")
    study.enqueue_trial({"x": 1})
    again, _ = open_storage(canonical)
    assert len(optuna.load_study(study_name="j", storage=again).get_trials()) == 1


@pytest.mark.parametrize("url", [
    "not-a-url",
    "nosuchdialect://host/db",
    "sqlite:////nonexistent-dir-slimformer/sub/study.db",
    "postgresql+psycopg2://someone:s3cret@127.0.0.1:1/nodb",
    "journal:",
    "journal:/nonexistent-dir-slimformer/study.log",
])
def test_bad_storage_url_is_a_one_line_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_storage(url, Path("unused"))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("storage ")
    assert "s3cret" not in msg, "passwords are never printed"
    shown = url.replace("s3cret", "***")
    assert shown in msg or url.split(":")[0] in msg


def test_unreachable_storage_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"storage postgresql\+psycopg2://nobody@127.0.0.1:1/db: cannot open"):
        search(cfg_path, progress=False, storage="postgresql+psycopg2://nobody@127.0.0.1:1/db")
    assert not (tmp_path / "run").exists()


def test_a_second_driver_on_the_same_run_dir_stops_before_writing(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=2,
                                                                  baselines=False, start_points="random"))
    (tmp_path / "run").mkdir()
    fd = lock_run_dir(tmp_path / "run")  # as a driver running on this run directory holds it
    try:
        with pytest.raises(ConfigError, match="is in use by another slimformer search"):
            search(cfg_path, progress=False)
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        unlock_run_dir(fd)
    search(cfg_path, progress=False)  # free again once the other driver is gone
    assert counted_trials(optuna.load_study(study_name="slimformer", storage=default_storage(tmp_path / "run"))) == 2


# ------------------------------------------------------------------------------- heartbeats and retries


def _running_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    trial.suggest_categorical("x", [1, 2, 3])
    trial.set_user_attr("start_point", "uniform")
    trial.set_user_attr("memory_bytes", 123)
    study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, "elsewhere:1")
    return study._storage.get_trial(trial._trial_id)


def _assert_failed_and_requeued(study: optuna.Study, stale: optuna.trial.FrozenTrial) -> None:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    dead = by_number[stale.number]
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["fail_reason"] == STALE
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retry) == 1
    assert retry[0].params == stale.params or retry[0].system_attrs["fixed_params"] == stale.params
    assert retry[0].system_attrs["failed_trial"] == stale.number
    assert "fail_reason" not in retry[0].user_attrs, "the retry starts clean and counts when it finishes"
    assert retry[0].user_attrs == {"start_point": "uniform"}
    assert counted_trials(study) == 0, "a dead worker's trial does not count"
    fail_stale_trials(study)  # idempotent: nothing more is stale
    assert len(study.get_trials(deepcopy=False)) == len(trials)


def test_journal_trial_of_a_dead_worker_is_failed_and_retried_once(tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = _study(storage)
    stale = _running_trial(study)
    storage.record_heartbeat(stale._trial_id)
    fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING, "a fresh heartbeat is alive"
    storage.set_trial_system_attr(stale._trial_id, HEARTBEAT_ATTR, time.time() - GRACE_PERIOD - 5)
    fail_stale_trials(study)
    _assert_failed_and_requeued(study, stale)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=needs_pg)])
def test_rdb_trial_of_a_dead_worker_is_failed_and_retried_once(kind: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hb.db'}" if kind == "sqlite" else PG_URL
    storage = HeartbeatRDBStorage(url, heartbeat_interval=1, grace_period=1,
                                  heartbeat_stale_trial_callback=RetryStaleTrial(1))
    study = _study(storage)
    try:
        stale = _running_trial(study)
        storage.record_heartbeat(stale._trial_id)
        time.sleep(2.5)
        fail_stale_trials(study)
        _assert_failed_and_requeued(study, stale)
    finally:
        optuna.delete_study(study_name=study.study_name, storage=storage)


# ------------------------------------------------------------------------------ several drivers, one study


def test_start_points_are_queued_once_per_study(tiny_ctx, tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    first = ensure_start_points(tiny_ctx, study)
    assert first > 0
    assert study.user_attrs[START_ATTR]["queued"] == first
    other = open_study(tiny_ctx, open_storage(f"journal:{tmp_path / 'j.log'}")[0], "s")
    assert ensure_start_points(tiny_ctx, other) == 0
    assert len(other.get_trials(deepcopy=False)) == first


def test_a_study_that_already_has_trials_gets_no_start_points(tiny_ctx, tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    study.enqueue_trial({})
    assert ensure_start_points(tiny_ctx, study) == 0
    assert len(study.get_trials(deepcopy=False)) == 1
    assert study.user_attrs[START_ATTR]["queued"] == 0


def _six_start_points(ctx):
    """The tiny context with a population of 6: 4 uniform start points, then sensitivity-guided ones."""
    sampler = ctx.config.sampler.model_copy(update={"population_size": 6})
    return replace(ctx, config=ctx.config.model_copy(update={"sampler": sampler}))


def _held_params(study: optuna.Study) -> list[dict]:
    return [t.params or t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False)]


def test_a_dead_drivers_start_claim_is_taken_over_in_seconds(tiny_ctx, tmp_path: Path) -> None:
    """Shared storage: an unfinished claim whose heartbeat stopped START_STALE_S ago is taken over (not waited on
    for START_WAIT_S), and the start points the dead claimant had queued are not queued twice."""
    ctx = _six_start_points(tiny_ctx)
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(ctx, storage, "s")
    first = tiny_ctx.space.default_params() | tiny_ctx.space.seed_params(tiny_ctx.budget_bytes)[0]
    study.enqueue_trial(first, user_attrs={"start_point": "uniform"})  # queued before its driver died
    old = time.time() - START_STALE_S - 1
    write_start_claim(study, StartClaim("deadhost:1:abc", old, None, old))
    lines: list[str] = []
    t0 = time.monotonic()
    queued = ensure_start_points(ctx, study, log=lines.append)
    assert time.monotonic() - t0 < 60 and queued > 0
    assert any("taking over the unfinished claim of deadhost:1:abc" in ln for ln in lines), lines
    claim = start_claim(study)
    assert claim is not None and claim.queued == queued and claim.by != "deadhost:1:abc"
    held = _held_params(study)
    assert len(held) == queued + 1 and all(held.count(p) == 1 for p in held), "no start point queued twice"
    assert study_sensitivity(study), "the sensitivity table is written by the new claimant"


def test_a_live_start_claim_is_waited_for(tiny_ctx, tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    now = time.time()
    write_start_claim(study, StartClaim("alive:2:abc", now, None, now))
    timer = threading.Timer(1.5, lambda: write_start_claim(study, StartClaim("alive:2:abc", now, 0, time.time())))
    timer.start()
    t0 = time.monotonic()
    assert ensure_start_points(tiny_ctx, study) == 0
    timer.join()
    assert 1.0 <= time.monotonic() - t0 < START_STALE_S, "waited for the live claimant, did not take over"
    assert study.get_trials(deepcopy=False) == []


def test_an_exclusive_driver_takes_over_an_unfinished_claim_at_once(tiny_ctx, tmp_path: Path) -> None:
    """The run directory's own study (its lock held by this driver): an unfinished claim is a killed driver's,
    however fresh its heartbeat."""
    storage, _, exclusive = make_storage(None, tmp_path / "run")
    study = open_study(tiny_ctx, storage, "s")
    now = time.time()
    write_start_claim(study, StartClaim("killed:3:abc", now, None, now))
    t0 = time.monotonic()
    queued = ensure_start_points(_six_start_points(tiny_ctx), study, exclusive=exclusive,
                                 sensitivity_path=tmp_path / "sens.json")
    assert exclusive and queued > 0 and time.monotonic() - t0 < START_STALE_S
    assert (tmp_path / "sens.json").is_file()


def test_a_plan_already_evaluated_is_answered_from_the_study(tiny_ctx, tmp_path: Path) -> None:
    """The same plan sampled again: PRUNED with the first trial's metrics and `duplicate_of`, not counted, not on
    the Pareto front, not among study.best_trials."""
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    plan = tiny_ctx.space.default_params() | tiny_ctx.space.seed_params(tiny_ctx.budget_bytes)[0]
    study.enqueue_trial(plan)
    study.enqueue_trial(plan)
    study.optimize(make_objective(tiny_ctx), n_trials=2)
    first, again = study.get_trials(deepcopy=False)
    assert first.state == TrialState.COMPLETE and TrialRecord.from_trial(first).evaluated
    rec = TrialRecord.from_trial(again)
    assert again.state == TrialState.PRUNED and rec.duplicate_of == 0 and not rec.evaluated
    assert rec.metrics == TrialRecord.from_trial(first).metrics
    assert counted_trials(study) == 1 and duplicate_trials(study) == 1
    assert [t.number for t in pareto_trials(study, tiny_ctx.config.objectives)] == [0]
    assert [t.number for t in study.best_trials] == [0]


def _complete(study: optuna.Study, n: int) -> None:
    for _ in range(n):
        t = study.ask()
        t.set_user_attr("feasible", True)
        study.tell(t, [0.5, 1.0, 1.0])


def test_a_trial_started_after_the_count_was_met_is_surplus(tiny_ctx, tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    _complete(study, 3)
    other = study.ask()  # another driver's trial, started first: it completes the count of 4
    storage.set_trial_system_attr(other._trial_id, WORKER_ATTR, "elsewhere:1")
    study.optimize(make_objective(tiny_ctx, limit=4), n_trials=1, catch=(RuntimeError,))
    mine = study.get_trials(deepcopy=False)[-1]
    assert mine.number == 4 and mine.state == TrialState.FAIL
    assert mine.user_attrs["fail_reason"] == SURPLUS
    assert counted_trials(study) == 3, "a surplus trial does not count"
    study.optimize(make_objective(tiny_ctx, limit=5), n_trials=1, catch=(RuntimeError,))
    assert study.get_trials(deepcopy=False)[-1].state == TrialState.COMPLETE, "room left: it runs"


def test_a_driver_stops_when_other_drivers_complete_the_study(tiny_ctx, tmp_path: Path) -> None:
    storage, _ = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = open_study(tiny_ctx, storage, "s")
    _complete(study, 3)
    other = study.ask()
    storage.set_trial_system_attr(other._trial_id, WORKER_ATTR, "elsewhere:1")
    timer = threading.Timer(1.5, lambda: (other.set_user_attr("feasible", True),
                                          study.tell(other, [0.5, 1.0, 1.0])))
    timer.start()
    t0 = time.monotonic()
    trial_loop(tiny_ctx, study, 4, None, progress=False)  # waits for the other driver's trial
    timer.join()
    assert time.monotonic() - t0 >= 1.0
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and counted_trials(trials) == 4, "nothing started past the count"
