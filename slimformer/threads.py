"""torch's intra-op thread count, changed in one place: a plain setter and a block that restores the
previous count (compression runs single-threaded inside a multi-threaded search, measurements run at
the profile's count)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MAX_THREADS = 1024  # an upper bound for every threads setting (configs, CLI): torch overflows on absurd counts


def set_threads(n: int) -> None:
    """Use n torch threads from now on (the process-wide setting)."""
    torch.set_num_threads(n)


@contextmanager
def using_threads(n: int | None = None) -> Iterator[None]:
    """Run the block at n torch threads (None: keep the current count) and restore the previous count
    afterwards, also when the block raises or changes the count itself."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
