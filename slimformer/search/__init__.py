"""Search: config, Optuna driver, baselines, run directory and report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer.search.config import SearchConfig
from slimformer.search.context import SearchContext, prepare
from slimformer.search.rundir import check_or_write_config, run_baselines, write_outputs
from slimformer.search.runner import default_storage, run_trials

__all__ = ["SearchConfig", "SearchContext", "SearchResult", "prepare", "run_search"]


@dataclass(frozen=True)
class SearchResult:
    run_dir: Path
    storage: str
    summary: dict[str, Any]


def run_search(config: SearchConfig, *, trials: int | None = None, timeout: float | None = None,
               storage: str | None = None, run_dir: str | Path | None = None, progress: bool = True,
               log: Any = None) -> SearchResult:
    """Run (or resume) a search and write its run directory. Bad input raises before anything is written."""
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
    ctx = prepare(config, log=say)
    out = Path(config.run_dir)
    if out.exists() and not out.is_dir():
        from slimformer.errors import ConfigError

        raise ConfigError(f"--run-dir {out} is a file; pass a directory path")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_or_write_config(out, config)
    except Exception:
        if created:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    url = config.storage or default_storage(out)
    baselines = run_baselines(ctx, out, say) if config.baselines else []
    say(f"searching: {config.trials} trials, storage {url}")
    study = run_trials(ctx, url, config.study_name, config.trials, config.timeout, progress=progress,
                       single_driver=config.storage is None, log=say, sensitivity_path=out / "sensitivity.json")
    summary = write_outputs(ctx, out, study, baselines, config.study_name, url, time.perf_counter() - start)
    return SearchResult(out, url, summary)
