"""Progress bars that suit where stderr goes: tqdm on a terminal, plain periodic lines in a log file.

tqdm redraws its bar with carriage returns, which a log that is not a terminal keeps as one `\\r` frame
per update; `progress_bar` returns a `LineProgress` there instead, which writes a whole line every
10% of the total or every 30 s, whichever comes first.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Protocol

LINE_FRACTION = 0.1
LINE_SECONDS = 30.0


class Progress(Protocol):
    """The part of tqdm's interface slimformer uses."""

    n: int
    total: int | None

    def update(self, n: int = 1) -> Any: ...
    def refresh(self) -> Any: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...
    def set_postfix(self, **kwargs: Any) -> Any: ...
    def close(self) -> Any: ...


class LineProgress:
    """tqdm's update/postfix/close interface, printed as `[slimformer] DESC: n/total (p%), Xs[, postfix]`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", disable: bool = False,
                 file: IO[str] | None = None, every_fraction: float = LINE_FRACTION,
                 every_seconds: float = LINE_SECONDS) -> None:
        self.n = 0
        self.total = total
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.file = file
        self.postfix = ""
        self._every_n = max(1, int((total or 0) * every_fraction)) if total else None
        self._every_s = every_seconds
        self._t0 = time.monotonic()
        self._last_n = 0
        self._last_t = self._t0
        self._closed = False
        self._pending = False  # a line is due; written at the next postfix/update/close, so it shows the postfix

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        return f"[slimformer] {self.desc}: {done}{pct}, {elapsed:.0f} s{post}"

    def _emit(self) -> None:
        if self.disable:
            return
        print(self._line(), file=self.file or sys.stderr, flush=True)
        self._last_n, self._last_t = self.n, time.monotonic()

    def _check(self) -> None:
        due_n = self._every_n is not None and self.n - self._last_n >= self._every_n
        if due_n or time.monotonic() - self._last_t >= self._every_s:
            self._pending = True

    def _flush(self) -> None:
        if self._pending:
            self._pending = False
            self._emit()

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        self._check()

    def refresh(self) -> None:
        self._check()
        self._flush()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        self._flush()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        self._flush()

    def close(self) -> None:
        if not self._closed and (self._pending or self.n != self._last_n):
            self._pending = False
            self._emit()
        self._closed = True


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where tqdm's redrawn bar belongs)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", disable: bool = False, **tqdm_kwargs: Any) -> Progress:
    """A tqdm bar when stderr is a terminal, else a `LineProgress` (plain lines, no carriage returns)."""
    if stderr_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, **tqdm_kwargs)
    return LineProgress(total, desc, unit=unit, disable=disable)
