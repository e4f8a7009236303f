"""slimformer.threads: the one place torch's thread count is changed; blocks restore the previous count."""

from __future__ import annotations

import pytest
import torch

from slimformer.threads import set_threads, using_threads


def test_using_threads_sets_and_restores_even_on_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), using_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_using_threads_none_keeps_the_count_and_undoes_changes_inside() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_threads():
        assert torch.get_num_threads() == before
        set_threads(other)
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
