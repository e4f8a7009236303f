"""Compact recipes: one `re:` rule per distinct spec, faithful to the plan; the long form reads the same."""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from slimformer.compression.apply import apply_plan
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.compression.recipe import Recipe
from slimformer.compression.rule_patterns import matches_exactly, pattern_for
from slimformer.hardware_profiles.validate import random_plan

MINILM_NAMES = ["embeddings.word_embeddings"] + [
    f"encoder.layer.{i}.{s}" for i in range(12) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]


@pytest.mark.parametrize("seed", range(40))
def test_pattern_matches_exactly_the_chosen_names(seed: int) -> None:
    rng = random.Random(seed)
    chosen = [n for n in MINILM_NAMES if rng.random() < rng.choice((0.2, 0.5, 0.9))] or [MINILM_NAMES[3]]
    pat = pattern_for(chosen, MINILM_NAMES)
    assert matches_exactly(pat, chosen, MINILM_NAMES), pat


def test_pattern_shapes() -> None:
    every_ffn = [n for n in MINILM_NAMES if n.endswith(("intermediate.dense", "output.dense"))
                 and "attention" not in n]
    assert pattern_for(every_ffn, MINILM_NAMES) == r"encoder\.layer\.\d+\.(?:intermediate|output)\.dense"
    qk = [f"encoder.layer.{i}.attention.self.{p}" for i in (1, 2, 3) for p in ("query", "key")]
    assert pattern_for(qk, MINILM_NAMES) == r"encoder\.layer\.[1-3]\.attention\.self\.(?:query|key)"
    assert pattern_for(["encoder.layer.10.output.dense", "encoder.layer.11.output.dense"], MINILM_NAMES) == \
        r"encoder\.layer\.(?:10|11)\.output\.dense"


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_and_long_recipes_give_identical_plans_and_tensors(tiny_any, seed: int) -> None:
    a = tiny_any
    plan, _ = random_plan(a, random.Random(seed))
    compact = Recipe.from_plan(plan, a)
    long = Recipe.from_plan(plan, a, compact=False)
    canon = canonical_plan(a, plan)
    assert len(compact.rules) <= len({s for s in canon.units.values() if not s.is_identity})
    assert len(compact.rules) <= len(long.rules)
    for recipe in (compact, long):
        assert recipe.to_plan(a) == canon
        assert Recipe.from_yaml(recipe.to_yaml()).to_plan(a) == canon
    assert all(not r.spec.to_spec().is_identity for r in compact.rules), "no rule repeats the default spec"
    torch.manual_seed(0)
    m1 = _tensors(apply_plan(a, compact.to_plan(a)))
    torch.manual_seed(0)
    m2 = _tensors(apply_plan(a, Recipe.from_yaml(long.to_yaml()).to_plan(a)))
    assert m1.keys() == m2.keys()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_long_form_yaml_with_every_field_is_read(tiny_bert) -> None:
    a = tiny_bert
    plan = CompressionPlan({n: UnitSpec(bits=4, group_size=32) for n in a.unit_names if "attention" in n})
    long = Recipe.from_plan(plan, a, compact=False)
    old_style = yaml.safe_dump(long.model_dump(mode="json"), sort_keys=False)  # the pre-compact writer's form
    assert "rank: null" in old_style and "layers: []" in old_style
    assert Recipe.from_yaml(old_style).to_plan(a) == Recipe.from_plan(plan, a).to_plan(a)


def test_compact_yaml_is_short(tiny_bert) -> None:
    a = tiny_bert
    plan = CompressionPlan({n: UnitSpec(bits=4, group_size=32, method="gptq") for n in a.unit_names})
    text = Recipe.from_plan(plan, a, provenance={"trial": 1}).to_yaml()
    rules = yaml.safe_load(text)["rules"]
    assert len(rules) == 1 and rules[0]["spec"] == {"bits": 4, "group_size": 32, "method": "gptq"}
    assert "layers:" not in text and "sharing:" not in text and "rank: null" not in text
    assert len(text.splitlines()) <= 12
