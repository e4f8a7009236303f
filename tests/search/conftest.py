"""Fixtures for the search tests: the tiny BERT on disk and one shared finished search run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory):
    """(config path, run dir, SearchResult) of a finished 8-trial tiny search; read-only."""
    return helpers.shared_run(tmp_path_factory)
