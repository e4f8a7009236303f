"""What every `slimformer` command shares: quiet third-party logging and input errors as one line, exit 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from slimformer.errors import SlimformerError

# option bounds (= slimformer.threads.MAX_THREADS, search.config.MAX_TRIALS / MAX_SAMPLES; not imported from
# there because those modules load torch and `slimformer --help` should not; tests/test_bad_input.py checks they agree)
MAX_THREADS = 1024
MAX_TRIALS = 10_000_000
MAX_SAMPLES = 1_000_000


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


def one_line(text: str) -> str:
    """`text` on one line (a message must never spill a second line onto stderr)."""
    return " ".join(str(text).split())


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn input errors into one line on stderr and exit code 2.

    Input errors are SlimformerError, raised where the input is read. The only other exception turned into
    one line is a file-system refusal that names its file (permission denied, no such directory, disk full on
    an output path): the user fixes those by choosing another path. Everything else is a bug and keeps its
    traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except SlimformerError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.filename is None or not exc.strerror:
                raise
            click.echo(f"error: {one_line(f'{exc.filename}: {exc.strerror}')}; check the path and its permissions",
                       err=True)
            sys.exit(2)

    return wrapper
