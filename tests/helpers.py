"""Shared helpers for the search / CLI / space tests: a tiny real BERT on disk and a tiny search config.

Imported as `from helpers import ...` (tests/ is on sys.path: pytest puts it there for tests/test_*.py,
and tests/search/conftest.py and tests/spaces/test_space.py add it for their directories).

The tiny model and the shared search run are built once per pytest session (cached here by the
session's base temp directory) so that tests in different directories reuse them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

LINEAR_ROLES = ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]

_CACHE: dict[tuple[str, ...], Any] = {}


def build_tiny_model(out_dir: Path, num_layers: int = 2) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, 4 heads, FFN 64) with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from slimformer.models import packaged_minilm_dir

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=64, vocab_size=30522)
    model = BertModel(cfg, add_pooling_layer=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(packaged_minilm_dir()).save_pretrained(out_dir)
    return out_dir


def tiny_model_dir(tmp_path_factory: Any, num_layers: int = 2) -> Path:
    """The session's tiny model directory (built on first use)."""
    key = ("model", str(tmp_path_factory.getbasetemp()), str(num_layers))
    if key not in _CACHE:
        _CACHE[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-bert-{num_layers}l"), num_layers)
    return _CACHE[key]


def tiny_config(model_dir: Path | str, run_dir: Path | str, **overrides: Any) -> dict[str, Any]:
    """The tiny search config as a plain dict; top-level keys in `overrides` replace the defaults."""
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "data": {"search_samples": 16, "heldout_samples": 16, "calibration_samples": 8, "batch_size": 16,
                 "max_length": 32},
        "space": {"groups": [
            {"select": {"role": ["embedding"]}, "bits": [8, 4], "group_size": [16, 32]},
            {"select": {"role": list(LINEAR_ROLES)}, "bits": [8, 4], "rank_fraction": [1.0, 0.5]},
        ]},
        "budget": {"memory": "40%"},
        "trials": 8,
        "sampler": {"name": "nsga2", "population_size": 4},
        "baselines": True,
        "threads": 1,
        "device": "cpu",
        "run_dir": str(run_dir),
    }
    cfg.update(copy.deepcopy(overrides))
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def shared_run(tmp_path_factory: Any) -> tuple[Path, Path, Any]:
    """(config path, run dir, SearchResult) of one finished tiny search (8 trials, baselines), run once.

    Tests must treat this run directory as read-only.
    """
    key = ("run", str(tmp_path_factory.getbasetemp()))
    if key not in _CACHE:
        from slimformer.api import search

        base = tmp_path_factory.mktemp("shared-run")
        cfg_path = write_config(base / "search.yaml", tiny_config(tiny_model_dir(tmp_path_factory),
                                                                 base / "run"))
        _CACHE[key] = (cfg_path, base / "run", search(cfg_path, progress=False))
    return _CACHE[key]


def study_trials(storage: str, study_name: str = "slimformer") -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


def invoke(*args: object) -> Any:
    """Run the `slimformer` CLI in-process with stdout and stderr kept apart (click >= 8.2 always separates them)."""
    from click.testing import CliRunner

    from slimformer.cli import main

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
