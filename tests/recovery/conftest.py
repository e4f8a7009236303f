"""Recovery tests: tests/ on sys.path for `helpers` (tiny model on disk, tiny search config)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _single_thread():
    """Recovery tests run single-threaded: tiny models' small ops are 5-10x faster that way on a shared,
    oversubscribed CPU (measured 0.13 vs 1.0 s per step with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
