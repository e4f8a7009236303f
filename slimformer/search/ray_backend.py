"""`--backend ray`: N Ray workers run the same trial loop on one shared Optuna study.

Design (not Ray Tune + OptunaSearch): every worker runs runner.run_trials against the study's storage,
exactly like several `slimformer search` processes on one storage URL; Optuna's storage is the only
coordination (trial numbers, the sampler's view of finished trials, heartbeats), so resume, the trial
count, infeasible-sample accounting and the run directory are the local backend's, unchanged. Tune would
add a second scheduler and trial bookkeeping that must be mapped back onto the study.

  - The driver prepares everything (model, data, teacher outputs, baselines, start points), ships the
    prepared SearchContext once with `ray.put` (each worker gets its own empty decomposition cache), starts
    N tasks, shows progress from the study, and writes the outputs, as the local backend does.
  - Without --address: a local Ray instance (node IP 127.0.0.1, so every Ray server listens on loopback
    only; no dashboard) with the machine's CPUs, and the run
    directory's own SQLite `study.db` (busy timeout 60 s, heartbeats on in the workers) as the storage, so
    the run directory is the same as a local run's and either backend can resume it.
  - With --address: join that cluster; the storage must be a database server every node reaches
    (--storage postgresql+psycopg2://...), else ConfigError.
  - Each worker sets torch's threads to max(1, CPUs // N), so N workers do not oversubscribe the cores.
  - A worker whose process dies is retried by Ray (its running trial is failed by heartbeat and re-queued).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from slimformer.errors import ConfigError
from slimformer.search.context import SearchContext
from slimformer.search.records import counted_trials
from slimformer.search.runner import ensure_start_points, fail_interrupted, open_study, run_trials
from slimformer.search.storage import (
    WORKER_ATTR,
    close_storage,
    hide_password,
    is_network_url,
    open_storage,
    worker_id,
)
from slimformer.threads import set_threads

BACKENDS = ("local", "ray")
LOOPBACK = "127.0.0.1"  # the local Ray instance's node IP: every Ray server listens on loopback only
POLL_S = 2.0


def check_options(backend: str, address: str | None, workers: int | None, storage: str | None) -> None:
    """Validate --backend/--address/--workers before anything is loaded or written."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        if address is not None or workers is not None:
            raise ConfigError("--address and --workers apply to --backend ray; add --backend ray or drop them")
        return
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'slimformer[ray]' (or pip install ray)")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    if address is not None and (storage is None or not is_network_url(storage)):
        where = "the run directory's SQLite file" if storage is None else hide_password(storage)
        raise ConfigError(f"--address {address}: workers on other machines cannot share {where}; pass --storage "
                          "with a database server URL they reach, e.g. postgresql+psycopg2://USER@HOST:5432/DB")


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_workers(cpus: int, workers: int | None) -> tuple[int, int, float]:
    """(workers, torch threads per worker, Ray CPUs reserved per worker) for `cpus` CPUs."""
    n = workers or max(1, cpus)
    threads = max(1, cpus // n)
    return n, threads, max(0.01, min(float(threads), cpus / n))


@contextmanager
def loopback_node() -> Iterator[None]:
    """While a local Ray instance starts, keep its node on 127.0.0.1 so that every Ray server (GCS, raylet,
    object manager, workers' and driver's gRPC, runtime-env agent) listens on loopback only.

    Ray binds its servers to all interfaces unless the node IP is exactly 127.0.0.1, and ray.init turns a
    given 127.0.0.1 into the machine's outward address unless Ray's local-only mode (its default on macOS and
    Windows, `ray_constants.ENABLE_RAY_CLUSTER` False) is on; it is switched on for the call and restored
    after (the node IP is fixed once the node runs; workers get it on their command line). Checked by
    tests/search/test_ray.py, which lists the Ray processes' listening sockets."""
    import ray._private.ray_constants as ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if before is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


def worker_main(ctx: SearchContext, url: str, run_dir_file: bool, study_name: str, trials: int,
                timeout: float | None, threads: int) -> dict[str, Any]:
    """One Ray worker: the local trial loop on the shared study (runs in the worker process)."""
    import torch

    set_threads(threads)
    storage, _ = open_storage(url, heartbeat=True, run_dir_file=run_dir_file)
    t0 = time.perf_counter()
    try:
        study = run_trials(ctx, storage, study_name, trials, timeout, progress=False, single_driver=False,
                           label=hide_password(url))
        me = worker_id()
        mine = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get(WORKER_ATTR) == me]
    finally:
        close_storage(storage)
    return {"worker": me, "threads": torch.get_num_threads(), "trials": len(mine),
            "seconds": round(time.perf_counter() - t0, 2)}


def run_ray(ctx: SearchContext, storage: optuna.storages.BaseStorage, url: str, exclusive: bool, study_name: str,
            trials: int, timeout: float | None, *, workers: int | None = None, address: str | None = None,
            progress: bool = True, log: Any = None, sensitivity_path: Path | None = None) -> optuna.Study:
    """Run the study's trials in Ray workers; returns the study when they are done."""
    import ray

    from slimformer.compression.apply import DecompositionCache

    say = log or (lambda msg: None)
    shown = hide_password(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(ctx, storage, study_name, shown)
    if exclusive:
        fail_interrupted(study)  # before any worker runs: RUNNING trials are a killed driver's
    ensure_start_points(ctx, study, log=say, sensitivity_path=sensitivity_path, exclusive=exclusive)
    done0 = counted_trials(study)
    if done0 >= trials:
        return study
    started = not ray.is_initialized()
    if started:
        if address is None:
            with loopback_node():
                ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False,
                         object_store_memory=max(256 * 1024**2, 3 * ctx.fp32_bytes + 128 * 1024**2),
                         logging_level="warning", configure_logging=True, _node_ip_address=LOOPBACK)
        else:
            try:
                ray.init(address=address, logging_level="warning")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]}"
                                  "); check the address (ray://HOST:10001 or HOST:6379) and that it is up") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if address is not None else local_cpus()
        n, threads, reserve = plan_workers(cpus, workers)
        ctx_ref = ray.put(replace(ctx, cache=DecompositionCache()))
        say(f"ray: {n} worker(s) x {threads} torch thread(s) on {cpus} CPU(s), storage {shown}")
        task = ray.remote(worker_main).options(num_cpus=reserve, max_retries=2, retry_exceptions=False)
        pending = [task.remote(ctx_ref, url, exclusive, study_name, trials, timeout, threads) for _ in range(n)]
        results, errors = wait_for(pending, study, trials, done0, progress)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if started:
        ray.shutdown()
    for r in results:
        say(f"ray worker {r['worker']}: {r['trials']} trial(s) in {r['seconds']} s")
    if errors and not results:
        raise RuntimeError(f"every Ray worker failed; first error: {errors[0]}")
    for e in errors:
        say(f"ray worker failed: {e}")
    return study


def wait_for(pending: list[Any], study: optuna.Study, trials: int, done0: int, progress: bool
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Wait for the worker tasks, showing the study's progress; (results, error lines)."""
    import ray

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    bar = tqdm(total=max(0, trials - done0), desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                try:
                    results.append(ray.get(ref))
                except Exception as exc:  # a worker's own error (RayTaskError) or its lost process
                    errors.append(str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc))
            bar.update(max(0, min(counted_trials(study), trials) - done0 - bar.n))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return results, errors
