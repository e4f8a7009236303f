"""A search whose space offers embedding tiers: rows ranked on the search's own text, recipes carry the tiers and
apply to the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import LINEAR_ROLES, invoke, tiny_config, tiny_model_dir, write_config

from slimformer.compression.recipe import Recipe


@pytest.mark.filterwarnings("ignore")
def test_search_with_tiers_writes_recipes_that_carry_them(tmp_path_factory: pytest.TempPathFactory,
                                                          tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path_factory)
    space = {"groups": [
        {"select": {"role": ["embedding"]}, "tiers": ["int8:300,int4/16:2000,int2/16", "int2/16"]},
        {"select": {"role": list(LINEAR_ROLES)}, "bits": [8, 4]},
    ]}
    cfg = write_config(tmp_path / "s.yaml", tiny_config(model, tmp_path / "run", space=space, trials=4,
                                                       baselines=False))
    res = invoke("search", cfg)
    assert res.exit_code == 0, res.stderr
    recipes = sorted((tmp_path / "run" / "recipes").glob("trial-*.yaml"))
    assert recipes
    rec = Recipe.load(recipes[0])
    assert rec.embedding_tiers is not None
    assert rec.embedding_tiers.ranking.source == "search and calibration text"
    assert [t.tier for t in rec.embedding_tiers.tiers][-1] == "int2"
    out = tmp_path / "applied"
    res = invoke("apply", recipes[0], "--model", model, "--out", out, "--samples", 8)
    assert res.exit_code == 0, res.stderr
