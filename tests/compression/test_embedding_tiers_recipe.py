"""Recipes carrying embedding tiers: YAML round trip, and bad tier sections exit 2 with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import invoke, tiny_model_dir

from slimformer.compression.embedding_tiers import Tier, TierSpec, TokenRanking
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.errors import RecipeError
from slimformer.models import load

EMB = "embeddings.word_embeddings"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def _recipe_doc(adapter, **tier_changes) -> dict:
    vocab = adapter.unit(EMB).shape[0]
    spec = TierSpec((Tier("int8", 100), Tier("int2", None, 16)), TokenRanking(vocab, (9, 4, 1), "three ids"))
    plan = CompressionPlan({EMB: UnitSpec(tiers=spec)})
    doc = yaml.safe_load(Recipe.from_plan(plan, adapter).to_yaml())
    doc["embedding_tiers"].update(tier_changes)
    return doc


def test_yaml_round_trip_keeps_tiers_and_ranking(model_dir: Path) -> None:
    a = load(str(model_dir))
    doc = _recipe_doc(a)
    text = Recipe.from_yaml(yaml.safe_dump(doc)).to_yaml()
    assert "embedding_tiers:" in text and "{tier: int8, rows: 100}" in text and "{tier: int2, group_size: 16}" in text
    plan = Recipe.from_yaml(text).to_plan(a)
    spec = plan.unit(EMB).tiers
    assert spec is not None and spec.ranking.frequent == (9, 4, 1) and spec.ranking.source == "three ids"
    assert spec.tiers == (Tier("int8", 100), Tier("int2", None, 16))


def test_old_recipes_have_no_tiers(model_dir: Path) -> None:
    a = load(str(model_dir))
    rec = Recipe.from_yaml("slimformer_recipe: 1\nmodel: {id: tiny}\nrules:\n"
                           "  - {match: embeddings.word_embeddings, spec: {bits: 4, group_size: 16}}\n")
    assert rec.embedding_tiers is None and rec.to_plan(a).unit(EMB).bits == 4
    assert "embedding_tiers" not in rec.to_yaml()


@pytest.mark.parametrize("change,needle", [
    ({"tiers": [{"tier": "int3", "rows": 10}, {"tier": "int2", "group_size": 16}]}, "unknown embedding tier 'int3'"),
    ({"version": 3}, "embedding_tiers version 3 is newer"),
    ({"tiers": [{"tier": "pq4", "rows": 10}, {"tier": "int2", "group_size": 16}]}, "unknown embedding tier 'pq4'"),
    ({"version": 2, "tiers": [{"tier": "pq", "group_size": 3}]}, "tier pq needs a sub-vector width"),
    ({"tiers": [{"tier": "pq", "group_size": 8}]}, "tier pq needs `version: 2`"),
    ({"ranking": {"vocab": 30522, "ids": "AAAA"}}, "ranking.ids is not base64 zlib data"),
    ({"ranking": {"vocab": 5, "ids": "eJxjYGBgAAAABAAB"}}, "the recipe was made for another tokenizer"),
    ({"match": "encoder.layer.0.attention.self.query"}, "is not an embedding table"),
])
def test_bad_tier_sections_exit_2_with_one_line(model_dir: Path, tmp_path: Path, change: dict, needle: str) -> None:
    a = load(str(model_dir))
    doc = _recipe_doc(a, **change)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RecipeError, match=needle.replace("(", r"\(")):
        Recipe.load(path).to_plan(a)
    res = invoke("apply", path, "--model", model_dir, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert not (tmp_path / "out").exists()
