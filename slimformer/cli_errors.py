"""What every `slimformer` command shares: one clean `warning:` line per notice, third-party noise silenced
unless `--verbose`, and input errors as one line with exit code 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any, TextIO

import click

from slimformer.errors import SlimformerError, SlimformerWarning

# Loggers whose WARNING records are start-up chatter, not advice for a slimformer user (hidden without --verbose).
NOISY_LOGGERS = ("ray._private.authentication.authentication_token_setup",)

# option bounds (= slimformer.threads.MAX_THREADS, search.config.MAX_TRIALS / MAX_SAMPLES; not imported from
# there because those modules load torch and `slimformer --help` should not; tests/test_bad_input.py checks they agree)
MAX_THREADS = 1024
MAX_TRIALS = 10_000_000
MAX_SAMPLES = 1_000_000


class _DropBelowError(logging.Filter):
    """Keep only ERROR and worse from a chatty third-party logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_DROP = _DropBelowError()


class WarningPrinter:
    """`warnings.showwarning` replacement: a SlimformerWarning becomes one `warning: MESSAGE` line on stderr,
    each distinct message once; other libraries' warnings are dropped, or shown as Python would with verbose."""

    def __init__(self, verbose: bool, original: Callable[..., Any]) -> None:
        self.verbose = verbose
        self.original = original
        self.seen: set[str] = set()

    def __call__(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, SlimformerWarning):
            text = str(message)
            if text not in self.seen:
                self.seen.add(text)
                click.echo(f"warning: {text}", err=True)
        elif self.verbose:
            self.original(message, category, filename, lineno, file, line)


def configure_output(verbose: bool = False) -> None:
    """Set up warnings and third-party logging for a command; imports no heavy library.

    Without `verbose`: INFO logs of every library are off (`logging.disable(INFO)`: Optuna's "Using an existing
    study" and trial lines, Ray's start-up lines), transformers logs only errors and Hugging Face hub bars are
    hidden (environment variables read when they are imported), Ray's token-auth notice is dropped, and only
    slimformer's own notices are printed.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    original = warnings.showwarning
    if isinstance(original, WarningPrinter):
        original = original.original
    warnings.showwarning = WarningPrinter(verbose, original)
    warnings.simplefilter("always", SlimformerWarning)  # WarningPrinter de-duplicates by message
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_DROP)
        elif _DROP not in logger.filters:
            logger.addFilter(_DROP)
    if verbose:
        logging.disable(logging.NOTSET)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.disable(logging.INFO)
    if "transformers" in sys.modules:  # already imported (Python API callers, tests): its env vars were read
        tf_logging = sys.modules["transformers"].utils.logging
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()


def is_verbose() -> bool:
    """The root command's `--verbose` flag (False outside a click command)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("verbose"))


def one_line(text: str) -> str:
    """`text` on one line (a message must never spill a second line onto stderr)."""
    return " ".join(str(text).split())


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Configure output (see `configure_output`), then turn input errors into one line on stderr and exit 2.

    Input errors are SlimformerError, raised where the input is read. The only other exception turned into
    one line is a file-system refusal that names its file (permission denied, no such directory, disk full on
    an output path): the user fixes those by choosing another path. Everything else is a bug and keeps its
    traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        prev_disable, prev_show = logging.root.manager.disable, warnings.showwarning
        configure_output(is_verbose())
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
        finally:  # in-process callers (tests, CliRunner) get their logging and warning display back
            logging.disable(prev_disable)
            warnings.showwarning = prev_show

    return wrapper


def int_list(ctx: Any, param: Any, value: str | None) -> tuple[int, ...] | None:
    """click callback: `64,128` -> (64, 128); every value an integer from 1 to 65536 (None stays None)."""
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not vals or min(vals) < 1 or max(vals) > 65536:
        raise click.BadParameter(f"expected comma-separated integers from 1 to 65536, got {value!r}")
    return vals


no_progress_option = click.option(
    "--no-progress", is_flag=True,
    help="No progress bars or [slimformer] progress lines on stderr (warnings and errors still print).")

json_option = click.option(
    "--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
    help="Also write the result as JSON to FILE; `--json` alone (or `--json -`) prints JSON on stdout instead "
         "of the text output.")


def progress_logger(no_progress: bool) -> Callable[[str], None] | None:
    """The `[slimformer] ...` line writer for a command's phases, or None with --no-progress."""
    if no_progress:
        return None
    return lambda msg: click.echo(f"[slimformer] {msg}", err=True)


def write_json_out(json_out: str, payload: Any) -> None:
    """`--json` output: stdout for '-', else the file (its folder created), then a `wrote FILE` line."""
    import json
    from pathlib import Path

    text = json.dumps(payload, indent=2) + "\n"
    if json_out == "-":
        click.echo(text, nl=False)
        return
    path = Path(json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {path}")
