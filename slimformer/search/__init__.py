"""Search: config, Optuna driver, baselines, run directory and report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer.fileio import check_output_path
from slimformer.search.config import SearchConfig
from slimformer.search.context import SearchContext, prepare
from slimformer.search.recover_stage import recover_in_search
from slimformer.search.results import SearchSummary
from slimformer.search.rundir import check_or_write_config, run_baselines, write_outputs
from slimformer.search.runner import run_trials
from slimformer.search.storage import (
    check_storage_url,
    close_storage,
    hide_password,
    lock_run_dir,
    make_storage,
    unlock_run_dir,
)

__all__ = ["SearchConfig", "SearchContext", "SearchResult", "SearchSummary", "prepare", "run_search"]


@dataclass(frozen=True)
class SearchResult:
    """A finished search: its run directory, storage URL (password hidden) and summary (summary.json)."""

    run_dir: Path
    storage: str
    summary: SearchSummary


def run_search(config: SearchConfig, *, trials: int | None = None, timeout: float | None = None,
               storage: str | None = None, run_dir: str | Path | None = None, progress: bool = True,
               log: Any = None, backend: str = "local", address: str | None = None,
               workers: int | None = None) -> SearchResult:
    """Run (or resume) a search and write its run directory. Bad input raises before anything is written.

    backend "local" runs the trials in this process; "ray" runs them in `workers` Ray workers sharing the
    study (search/ray_backend.py; `address` joins a running Ray cluster, which needs a network `storage`).
    Several processes given one shared `storage` URL and study name work on one study together.
    """
    say = log or (lambda msg: None)
    start = time.perf_counter()
    updates: dict[str, Any] = {}
    if trials is not None:
        updates["trials"] = trials
    if timeout is not None:
        updates["timeout"] = timeout
    if storage is not None:
        updates["storage"] = storage
    if run_dir is not None:
        updates["run_dir"] = str(run_dir)
    config = SearchConfig.model_validate({**config.model_dump(), **updates})
    out = Path(config.run_dir)
    if out.exists() and not out.is_dir():
        from slimformer.errors import ConfigError

        raise ConfigError(f"--run-dir {out} is a file; pass a directory path")
    check_output_path(out, "--run-dir", kind="dir")
    if backend != "local" or address is not None or workers is not None:
        from slimformer.search.ray_backend import check_options

        check_options(backend, address, workers, config.storage)
    # a shared storage is checked (form, driver, directory) before the model is loaded, and opened (which may
    # create its file) once the model and budgets are validated, before the teacher outputs; the default one
    # lives in the run dir
    if config.storage is not None:
        check_storage_url(config.storage)
    shared: tuple[Any, str, bool] | None = None

    def open_shared() -> None:
        nonlocal shared
        if config.storage is not None:
            shared = make_storage(config.storage, out)

    ctx = prepare(config, log=log, validated=open_shared)  # no log: prepare's hardware-mismatch line goes to logging
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        lock = lock_run_dir(out) if shared is None else None  # one driver per run-dir study
        check_or_write_config(out, config)
    except Exception:
        unlock_run_dir(lock)
        if created:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        study_storage, url, exclusive = shared or make_storage(None, out)
    except Exception:
        unlock_run_dir(lock)
        raise
    shown = hide_password(url)
    try:
        baselines = run_baselines(ctx, out, say) if config.baselines else []
        say(f"searching: {config.trials} trials, storage {shown}")
        if backend == "ray":
            from slimformer.search.ray_backend import run_ray

            study = run_ray(ctx, study_storage, url, exclusive, config.study_name, config.trials, config.timeout,
                            workers=workers, address=address, progress=progress, log=say,
                            sensitivity_path=out / "sensitivity.json")
        else:
            study = run_trials(ctx, study_storage, config.study_name, config.trials, config.timeout,
                               progress=progress, single_driver=exclusive, log=say,
                               sensitivity_path=out / "sensitivity.json", label=shown)
        recovered = recover_in_search(ctx, study, log=say, run_dir=out)  # the recovered plans join the study as trials
        summary = write_outputs(ctx, out, study, baselines, config.study_name, shown, time.perf_counter() - start,
                                log=say, recovered_models=recovered)
    finally:
        close_storage(study_storage)
        unlock_run_dir(lock)
    return SearchResult(out, shown, summary)
