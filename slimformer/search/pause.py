"""Test support: hold a search at a named phase so that a test can kill it there (kill -9 tests).

`SLIMFORMER_TEST_PAUSE_AT=PHASE` (read here only) makes `pause_at(PHASE)` print one line to stderr and
sleep until the process is killed. Phases: baselines (after the first baseline is stored), sensitivity
(after the first sensitivity measurement), start-points (after the first start point is queued), trial
(inside the first trial that starts after two trials have finished), outputs (after pareto.json is
written, before the recipes' report is done). Unset (always, outside tests), `pause_at` does nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

ENV = "SLIMFORMER_TEST_PAUSE_AT"
PHASES = ("baselines", "sensitivity", "start-points", "trial", "outputs")


def pause_at(phase: str, when: Callable[[], bool] | None = None) -> None:
    """Sleep here for good when the environment asks to pause at `phase` (and `when()` holds; test support)."""
    if os.environ.get(ENV) != phase or (when is not None and not when()):
        return
    print(f"slimformer-test: paused at {phase} (pid {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
