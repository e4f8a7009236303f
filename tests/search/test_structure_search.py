"""A tiny search that prunes heads and neurons: the data-driven structure is the default, it is collected once,
recorded in the recipes, and `apply` re-applies a recipe to the quality the search measured."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import tiny_config, write_config

from slimformer.api import apply_recipe, search
from slimformer.compression.plan import StructureSpec
from slimformer.compression.recipe import Recipe
from slimformer.models import load
from slimformer.search.config import SearchConfig
from slimformer.search.context import prepare


def test_pruning_search_records_and_reapplies_the_structure(tmp_path: Path, tiny_model_dir: Path) -> None:
    space = {"groups": [{"select": {"role": ["query", "key", "value", "attn_out"]}, "heads_kept": [2, 4],
                         "bits": [8]},
                        {"select": {"role": ["ffn_in", "ffn_out"]}, "neurons_kept": [0.5, 1.0], "bits": [8]}],
             "per_layer": False}
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", space=space, trials=4, baselines=False,
                      budget={"memory": "100%"}, deploy="safetensors", data={"search_samples": 16, "heldout_samples": 8,
                                                       "calibration_samples": 8, "batch_size": 16, "max_length": 32})
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    ctx = prepare(SearchConfig.load(cfg_path))
    assert ctx.structure_stats is not None and len(ctx.structure_stats.moments) == 2 * len(ctx.adapter.layers)
    res = search(cfg_path)
    entries = json.loads((res.run_dir / "pareto.json").read_text())["trials"]
    adapter = load(str(tiny_model_dir))
    pruned = [e for e in entries if Recipe.load(res.run_dir / e["recipe"]).layers]
    assert pruned, "the front holds no pruned plan"
    for e in pruned:
        rec = Recipe.load(res.run_dir / e["recipe"])
        assert rec.structure is not None and rec.to_plan(adapter).structure == StructureSpec("activation", True)
        out = apply_recipe(rec, str(tiny_model_dir), samples=8, calibration=8)
        assert out.memory.total_bytes == e["memory_bytes"]
        assert abs(out.fidelity["cosine"] - e["heldout_metrics"]["cosine"]) < 1e-4
