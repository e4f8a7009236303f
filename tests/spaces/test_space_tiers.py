"""The `tiers` axis of the search space: embedding-table tier layouts as categorical choices."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import helpers  # noqa: E402

from slimformer.compression.embedding_tiers import Tier, TokenRanking, layout_text, parse_layout  # noqa: E402
from slimformer.compression.memory import plan_memory  # noqa: E402
from slimformer.models import load  # noqa: E402
from slimformer.spaces.config import SpaceConfig  # noqa: E402
from slimformer.spaces.space import SearchSpace  # noqa: E402

LAYOUT = "int8:2000,int4/16:6000,int2/16"
SPACE = {"groups": [
    {"select": {"role": ["embedding"]}, "bits": [8], "tiers": ["none", LAYOUT, "int2/32"]},
    {"select": {"role": helpers.LINEAR_ROLES}, "bits": [8, 4]},
]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    return load(str(helpers.tiny_model_dir(tmp_path_factory)))


def test_layout_text_round_trip() -> None:
    tiers = parse_layout(LAYOUT)
    assert tiers == (Tier("int8", 2000), Tier("int4", 6000, 16), Tier("int2", None, 16))
    assert layout_text(tiers) == LAYOUT


def test_tiers_are_a_categorical_axis_of_the_embedding(adapter) -> None:
    space = SearchSpace(adapter, SpaceConfig.model_validate(SPACE))
    assert space.has_tiers
    dists = space.distributions()
    name = next(n for n in dists if n.endswith(".tiers"))
    assert list(dists[name].choices) == ["none", LAYOUT, "int2/32"]
    emb = next(u for u in adapter.units if u.kind == "embedding")
    ranking = TokenRanking(emb.shape[0], (7, 3, 11), "test")
    space.use_token_ranking(ranking)
    plan = space.plan_from_params({name: LAYOUT})
    spec = plan.unit(emb.name)
    assert spec.tiers is not None and spec.tiers.tiers == parse_layout(LAYOUT) and spec.tiers.ranking == ranking
    assert space.plan_from_params({name: "none"}).unit(emb.name).bits == 8
    # the smallest plan takes the all-int2 layout: fewer bytes than int8 rows
    assert space.min_memory_plan().unit(emb.name).tiers.tiers == parse_layout("int2/32")
    sizes = [plan_memory(adapter, space.plan_from_params({name: c})).total_bytes for c in dists[name].choices]
    assert sizes[2] < sizes[1] < sizes[0]


@pytest.mark.parametrize("layout,match", [("int3:10,int2/64", "unknown embedding tier 'int3'"),
                                          ("int8:100,int4/32:200", "the last tier takes the remaining rows"),
                                          ("int2", "tier int2 needs a group_size"),
                                          ("int4/16:100,pq/3", "tier pq needs a sub-vector width")])
def test_bad_layouts_are_rejected_with_the_reason(layout, match) -> None:
    with pytest.raises(ValidationError, match=match):
        SpaceConfig.model_validate({"groups": [{"select": {"role": ["embedding"]}, "tiers": [layout]}]})


def test_a_pq_layout_is_a_choice_with_fewer_bytes_than_int2(adapter) -> None:
    space = SearchSpace(adapter, SpaceConfig.model_validate({"groups": [
        {"select": {"role": ["embedding"]}, "tiers": ["int4/16:100,int2/16", "int4/16:100,pq/8"]}]}))
    name = next(n for n in space.distributions() if n.endswith(".tiers"))
    emb = next(u for u in adapter.units if u.kind == "embedding")
    space.use_token_ranking(TokenRanking(emb.shape[0], (7, 3, 11), "test"))
    int2, pq = (plan_memory(adapter, space.plan_from_params({name: c})).total_bytes
                for c in ("int4/16:100,int2/16", "int4/16:100,pq/8"))
    assert parse_layout("int4/16:100,pq/8")[-1] == Tier("pq", None, 8) and pq < int2
