"""Recovery tests: tests/ on sys.path for `helpers` (tiny model on disk, tiny search config). They run
single-threaded through the root conftest's `_single_thread` fixture."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
