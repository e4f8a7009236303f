"""What every `slimformer` command shares: quiet third-party logging and input errors as one line, exit 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from slimformer.errors import SlimformerError


def quiet_libraries() -> None:
    """Silence progress bars, FutureWarnings and transformers load reports on the command line."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency; logging tweaks are optional
        pass


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn input errors into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except SlimformerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
