"""Optuna storages for a search: the run directory's own SQLite file, any RDB URL, or a journal file.

  (none)                 SQLite `study.db` in the run directory (WAL mode), owned by one driver (exclusive):
                         on resume, trials a killed driver left RUNNING are marked FAIL (runner.fail_interrupted);
                         the local Ray backend's workers share it, with heartbeats
  sqlite:///PATH, postgresql+psycopg2://USER@HOST:PORT/DB, mysql+pymysql://...   (any SQLAlchemy URL)
                         Optuna RDBStorage, shared: several `slimformer search` processes (or Ray workers)
                         may work on one study. Running trials record a heartbeat every HEARTBEAT_INTERVAL s;
                         a trial whose worker died is failed after GRACE_PERIOD s (fail_reason STALE) by the
                         next process that starts a trial, and its parameters are queued once more.
  journal:PATH           Optuna JournalStorage on a log file (one machine or a shared file system), shared,
                         with the same heartbeat/retry policy (heartbeats are trial system attrs there).

A URL that cannot be opened raises ConfigError (one line, password hidden) before anything is written.

Secrets: every URL written (config.yaml, recipe provenance, summary) or printed is masked by hide_password
(`user:***@host`). A masked URL read back (`report`, `export-recipe`, a resumed search) takes its password from
the environment variable SLIMFORMER_STORAGE_PASSWORD, else none, so that libpq finds it in PGPASSWORD or
~/.pgpass (the recommended way: a URL without a password). See docs/CLI.md#storage.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from slimformer.errors import ConfigError
from slimformer.search.records import STALE, TrialRecord, retry_attrs

HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 30  # a running trial without a heartbeat for this long belongs to a dead worker
MAX_RETRY = 1  # a stale trial's parameters are tried once more
HEARTBEAT_ATTR = "slimformer:heartbeat"  # trial system attr (journal storages): time.time() of the last beat
WORKER_ATTR = "slimformer:worker"  # trial system attr: host:pid of the process running it
JOURNAL = "journal:"
DEFAULT_FILE = "study.db"
URL_FORMS = "sqlite:///PATH, postgresql+psycopg2://USER@HOST:5432/DB or journal:PATH"
MASK = "***"
PASSWORD_ENV = "SLIMFORMER_STORAGE_PASSWORD"
_USERINFO = re.compile(r"(://[^/@:]*):[^/]*@")  # scheme://user:password@ (the password may hold any but '/')

_Retry: Any = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
    or optuna.storages.RetryFailedTrialCallback  # the name before Optuna 4.9 (deprecated alias since)
_RDB_CALLBACK_ARG = "heartbeat_stale_trial_callback" \
    if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage.__init__).parameters \
    else "failed_trial_callback"


def default_url(run_dir: Path) -> str:
    """The run directory's own SQLite study."""
    return f"sqlite:///{(Path(run_dir) / DEFAULT_FILE).resolve()}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_storage(url: str | None, run_dir: Path, *, heartbeat: bool | None = None
                 ) -> tuple[BaseStorage, str, bool]:
    """(storage, canonical URL, exclusive) for a search writing `run_dir`.

    `url` None: SQLite in the run directory (created), owned by this driver alone (exclusive). Any other
    URL is shared. `heartbeat` None: heartbeats (and retry of stale trials) on shared storages only; True
    also for the run directory's own file (a driver whose workers run in other processes).
    Raises ConfigError, having written nothing, when the storage cannot be opened.
    """
    if url is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        url = default_url(run_dir)
        return _rdb(url, bool(heartbeat), local_sqlite=True), url, True
    storage, canonical = open_storage(url, heartbeat=True if heartbeat is None else heartbeat)
    return storage, canonical, False


def open_storage(url: str, heartbeat: bool = True, run_dir_file: bool = False) -> tuple[BaseStorage, str]:
    """(storage, canonical URL) for a storage URL; ConfigError when it cannot be opened. `run_dir_file`: the
    URL is a run directory's own SQLite file (WAL mode, see _wal)."""
    url = url.strip()
    if url.startswith(JOURNAL):
        return _journal(url, heartbeat)
    if "://" not in url:
        raise ConfigError(f"storage {hide_password(url)!r} is not a storage URL; use {URL_FORMS}")
    return _rdb(with_password(url), heartbeat, local_sqlite=run_dir_file and url.startswith("sqlite")), url


def is_network_url(url: str) -> bool:
    """Whether a storage URL can be reached from other machines (a database server, not a local file)."""
    u = url.strip().lower()
    return "://" in u and not u.startswith(("sqlite", JOURNAL))


def hide_password(url: str) -> str:
    """The URL with its password, if any, replaced by *** (`postgresql://user:***@host/db`), for anything written
    or printed; also for URLs SQLAlchemy cannot parse."""
    return _USERINFO.sub(rf"\1:{MASK}@", url, count=1)


def with_password(url: str) -> str:
    """The URL to connect with: a masked password (read back from config.yaml) is replaced by the environment's
    SLIMFORMER_STORAGE_PASSWORD, or dropped (libpq then reads PGPASSWORD or ~/.pgpass)."""
    if "://" not in url or _USERINFO.search(url) is None:
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url
    if parsed.password != MASK:
        return url
    return parsed._replace(password=os.environ.get(PASSWORD_ENV) or None).render_as_string(hide_password=False)


def check_storage_url(url: str) -> None:
    """Validate a storage URL without opening it (nothing is written): its form, the database driver, and for
    file storages that the file's directory exists. ConfigError (password hidden) otherwise."""
    url = url.strip()
    if url.startswith(JOURNAL):
        path = _journal_path(url)
        if not os.access(path.parent, os.W_OK):
            raise ConfigError(f"storage {url}: directory {path.parent} is not writable; choose another path")
        return
    if "://" not in url:
        raise ConfigError(f"storage {hide_password(url)!r} is not a storage URL; use {URL_FORMS}")
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
        dialect.import_dbapi()
    except Exception as exc:
        raise ConfigError(f"storage {hide_password(url)}: cannot open it ({_one_line(exc)}); "
                          f"{_rdb_hint(url, exc)}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).expanduser().absolute()
        if path.is_dir():
            raise ConfigError(f"storage {url}: {path} is a directory; name a database file inside it")
        if not path.parent.is_dir():
            raise ConfigError(f"storage {url}: directory {path.parent} does not exist; create it first "
                              "(sqlite:////abs/path/study.db)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else exc.__class__.__name__
    if line.startswith("(") and ") " in line:  # "(psycopg2.OperationalError) connection ..." -> the message
        line = line.split(") ", 1)[1]
    return line[:200]


def _engine_kwargs(url: str) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # wait for other writers' locks instead of failing
    if scheme in ("postgresql", "postgresql+psycopg2", "postgresql+psycopg", "postgres"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if scheme in ("mysql", "mysql+pymysql", "mysql+mysqldb"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _rdb(url: str, heartbeat: bool, local_sqlite: bool = False) -> BaseStorage:
    kwargs: dict[str, Any] = {"engine_kwargs": _engine_kwargs(url)}
    if heartbeat:
        kwargs.update(heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
        kwargs[_RDB_CALLBACK_ARG] = RetryStaleTrial(MAX_RETRY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = HeartbeatRDBStorage(url, **kwargs)
    except Exception as exc:
        raise ConfigError(f"storage {hide_password(url)}: cannot open it ({_one_line(exc)}); "
                          f"{_rdb_hint(url, exc)}") from None
    if local_sqlite:
        _wal(storage)
    return storage


def _wal(storage: RDBStorage) -> None:
    """The run directory's SQLite file in WAL mode with synchronous=NORMAL: a commit no longer waits for an
    fsync (Optuna commits every parameter and attribute of a trial separately; with fsync that was most of
    an over-budget sample's time). A killed process loses nothing (its commits are in the OS's cache); only
    a power cut may lose the last commits, never the file's consistency. Readers and writers on one machine
    share a WAL file; a run directory on a network file system should use a database server instead."""
    from sqlalchemy import event

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables reconnect with the pragmas


def _rdb_hint(url: str, exc: Exception) -> str:
    scheme = url.split("://", 1)[0].lower()
    if isinstance(exc, ImportError) or "No module named" in str(exc) or "import DB access module" in str(exc):
        driver = {"postgresql": "psycopg2-binary", "postgres": "psycopg2-binary",
                  "postgresql+psycopg2": "psycopg2-binary", "postgresql+psycopg": "'psycopg[binary]'",
                  "mysql": "mysqlclient", "mysql+mysqldb": "mysqlclient", "mysql+pymysql": "PyMySQL"}.get(scheme)
        return f"install its driver (pip install {driver or 'DRIVER'}) or use another URL"
    if "Can't load plugin" in str(exc) or "Could not parse" in str(exc):
        return f"use {URL_FORMS}"
    if scheme.startswith("sqlite"):
        return "check that the file's directory exists and is writable (sqlite:////abs/path/study.db)"
    if "no longer compatible" in str(exc) or "upgrade" in str(exc).lower():
        return "upgrade the schema with `optuna storage upgrade --storage URL` or use a new database"
    return ("check that the server is running and reachable from here and that the user, password and "
            "database in the URL exist (e.g. postgresql+psycopg2://USER@HOST:5432/DB)")


def _journal_path(url: str) -> Path:
    """The log file of a `journal:PATH` URL; ConfigError when it is missing, a directory, or in a missing one."""
    raw = url[len(JOURNAL):].strip()
    if not raw:
        raise ConfigError(f"storage {url!r}: name the log file, e.g. journal:/shared/study.log")
    path = Path(raw).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"storage {url}: {path} is a directory; name a file inside it")
    if not path.parent.is_dir():
        raise ConfigError(f"storage {url}: directory {path.parent} does not exist; create it first")
    return path


def _journal(url: str, heartbeat: bool) -> tuple[BaseStorage, str]:
    from optuna.storages.journal import JournalFileBackend

    path = _journal_path(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            backend = JournalFileBackend(str(path))
            storage = HeartbeatJournalStorage(backend, HEARTBEAT_INTERVAL, GRACE_PERIOD) if heartbeat \
                else JournalStorage(backend)
    except Exception as exc:
        raise ConfigError(f"storage {url}: cannot open it ({_one_line(exc)}); check that {path.parent} "
                          "is writable") from None
    return storage, f"{JOURNAL}{path}"


class RetryStaleTrial:
    """Queue a heartbeat-stale trial's parameters once more (a new WAITING trial); the stale trial keeps
    its `fail_reason`, the new one starts clean (only its start-point label is carried over)."""

    def __init__(self, max_retry: int | None = MAX_RETRY) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._retry = _Retry(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        clean.user_attrs = retry_attrs(trial.user_attrs)
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("slimformer:")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._retry(study, clean)


def _tag_stale(storage: BaseStorage, trial_ids: list[int]) -> None:
    """Record why a stale trial is about to be failed (user attrs can only be set while it runs)."""
    for tid in trial_ids:
        try:
            TrialRecord(fail_reason=STALE).write_to(storage, tid)
        except (UpdateFinishedTrialError, KeyError):  # another process failed it first
            pass


class HeartbeatRDBStorage(RDBStorage):
    """RDBStorage whose heartbeat-stale trials carry fail_reason STALE."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        ids = super()._get_stale_trial_ids(study_id) if self.heartbeat_interval is not None else []
        _tag_stale(self, ids)
        return ids


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat protocol: a running trial's heartbeat is a trial system attr
    (wall-clock seconds; the processes sharing a journal share a clock or a synchronised one)."""

    def __init__(self, backend: Any, heartbeat_interval: int, grace_period: int,
                 callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = callback or RetryStaleTrial(MAX_RETRY)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except Exception:  # finished meanwhile (or failed as stale by another process): nothing to keep alive
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        ids = [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
               if HEARTBEAT_ATTR in t.system_attrs and now - float(t.system_attrs[HEARTBEAT_ATTR]) > self._grace_period]
        _tag_stale(self, ids)
        return ids

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_callback

    def get_failed_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:  # Optuna < 4.9
        return self._stale_callback


def lock_run_dir(run_dir: Path) -> int | None:
    """Hold an exclusive lock on the run directory's study.db (created if missing) while this driver uses it,
    so that a second driver started on the same run directory stops instead of failing the first one's
    running trials as interrupted. An flock, separate from SQLite's own locks (Ray workers and report
    readers still open the file); the OS releases it when the process ends, kill -9 included.
    Returns the lock's file descriptor for unlock_run_dir (None where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(Path(run_dir) / DEFAULT_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by another slimformer search (its {DEFAULT_FILE} is locked); wait "
                          "for it to finish, or run several drivers on one study with --storage URL") from None
    return fd


def unlock_run_dir(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def close_storage(storage: BaseStorage) -> None:
    """Close a storage's database connections (the last one to a WAL-mode SQLite file folds the WAL back in
    and removes study.db-wal and study.db-shm)."""
    engine = getattr(storage, "engine", None) or getattr(getattr(storage, "_backend", None), "engine", None)
    if engine is not None:
        engine.dispose()


def heartbeat_enabled(storage: BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose worker stopped sending heartbeats; no-op without heartbeats."""
    if heartbeat_enabled(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
