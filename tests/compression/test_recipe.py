"""Recipes: YAML round trips, plan <-> recipe, rule matching and clear errors."""

from __future__ import annotations

import pytest
import yaml

from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec, sharing_pattern
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.compression.recipe import RECIPE_VERSION, LayerRule, ModelRef, Recipe, Rule, SpecModel
from slimformer.errors import RecipeError


def _plan(a) -> CompressionPlan:
    units = {}
    for i, u in enumerate(a.units):
        units[u.name] = [UnitSpec(rank=8, bits=4, group_size=16), UnitSpec(sparsity=0.5, pattern="2:4", bits=8),
                         UnitSpec(sparsity=0.25, bits=16), UnitSpec(), UnitSpec(bits=8, group_size=32)][i % 5]
    n = len(a.layers)
    layers = {0: LayerSpec(2, 40), 1: LayerSpec(heads_kept=3), 2: LayerSpec()}
    return CompressionPlan(units, layers={i: v for i, v in layers.items() if i < n},
                           sharing=SharingSpec(((n - 2, n - 1),), "ffn"))


def _recipe(**kw) -> Recipe:
    base = dict(model=ModelRef(id="tiny-bert", sha256="ab" * 32), hardware_profile="cpu-x",
                rules=[Rule(match="re:.*query", spec=SpecModel(bits=8)),
                       Rule(match="embeddings.word_embeddings", spec=SpecModel(rank=16, bits=4, group_size=32))],
                layers=[LayerRule(layer=0, heads_kept=2)],
                sharing=None,
                provenance={"study": "s", "trial": 3, "metrics": {"search_cosine": 0.97, "memory_bytes": 1200}})
    base.update(kw)
    return Recipe(**base)


def test_yaml_round_trip(tmp_path) -> None:
    for recipe in (_recipe(), _recipe(rules=[], layers=[], hardware_profile=None, provenance={}),
                   _recipe(sharing={"groups": [[0, 1], [2, 3]], "scope": "attention"})):
        text = recipe.to_yaml()
        assert text.startswith(f"slimformer_recipe: {RECIPE_VERSION}\n")
        back = Recipe.from_yaml(text)
        assert back == recipe
        assert back.to_yaml() == text
        recipe.save(tmp_path / "r.yaml")
        assert Recipe.load(tmp_path / "r.yaml") == recipe
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"], "atomic save leaves no temp files"


def test_from_plan_to_plan_is_the_canonical_plan(tiny_any) -> None:
    a = tiny_any
    plan = _plan(a)
    recipe = Recipe.from_plan(plan, a, hardware_profile="hw", provenance={"trial": 1}, compact=False)
    assert recipe.model.id == a.model_id and recipe.model.sha256 == a.weights_sha256()
    assert all(not r.match.startswith("re:") for r in recipe.rules)
    canon = canonical_plan(a, plan)
    # long form: one exact rule per compressed unit of the canonical plan (shared-away twins carry the rep's spec)
    assert [r.match for r in recipe.rules] == [n for n in a.unit_names if n in canon.units]
    assert recipe.to_plan(a) == canon
    assert Recipe.from_plan(plan, a).to_plan(a) == canon  # the default, compact form: same plan
    assert Recipe.from_yaml(recipe.to_yaml()).to_plan(a) == canon
    # the canonical plan is a fixed point
    assert Recipe.from_plan(canon, a).to_plan(a) == canon
    n = len(a.layers)
    assert canon.sharing == SharingSpec(((n - 2, n - 1),), "ffn")
    # an identity layer spec is dropped; under ffn sharing a twin takes its representative's neurons only
    expected = {3: {0: LayerSpec(2, 40), 1: LayerSpec(heads_kept=3)},
                4: {0: LayerSpec(2, 40), 1: LayerSpec(heads_kept=3)},
                2: {0: LayerSpec(2, 40), 1: LayerSpec(3, 40)}}[n]
    assert canon.layers == expected


def test_from_plan_with_sharing_pattern(tiny_bert) -> None:
    plan = CompressionPlan({"encoder.layer.0.output.dense": UnitSpec(bits=4)},
                           sharing=sharing_pattern("cycle2", 4, "block"))
    recipe = Recipe.from_plan(plan, tiny_bert)
    assert recipe.sharing is not None and recipe.sharing.groups == [[0, 2], [1, 3]]
    back = recipe.to_plan(tiny_bert)
    assert back == canonical_plan(tiny_bert, plan)
    assert back.units["encoder.layer.2.output.dense"] == UnitSpec(bits=4)


def test_regex_rules_first_match_wins(tiny_bert) -> None:
    recipe = _recipe(rules=[
        Rule(match="encoder.layer.0.attention.self.query", spec=SpecModel(bits=16)),
        Rule(match=r"re:encoder\.layer\.\d+\.attention\.self\.(query|key)", spec=SpecModel(bits=8)),
        Rule(match=r"re:.*attention.*", spec=SpecModel(bits=4, group_size=8)),
        Rule(match=r"re:.*\.dense", spec=SpecModel(rank=4)),
    ], layers=[])
    plan = recipe.to_plan(tiny_bert)
    assert plan.units["encoder.layer.0.attention.self.query"] == UnitSpec(bits=16)
    assert plan.units["encoder.layer.1.attention.self.query"] == UnitSpec(bits=8)
    assert plan.units["encoder.layer.3.attention.self.key"] == UnitSpec(bits=8)
    assert plan.units["encoder.layer.2.attention.self.value"] == UnitSpec(bits=4, group_size=8)
    # attention.output.dense matched the attention rule first, not the .dense rule
    assert plan.units["encoder.layer.2.attention.output.dense"] == UnitSpec(bits=4, group_size=8)
    assert plan.units["encoder.layer.2.intermediate.dense"] == UnitSpec(rank=4)
    assert plan.units["encoder.layer.2.output.dense"] == UnitSpec(rank=4)
    assert "embeddings.word_embeddings" not in plan.units
    assert len(plan.units) == 4 * 6


def test_regex_is_a_full_match(tiny_bert) -> None:
    with pytest.raises(RecipeError, match=r"match no unit of tiny-bert: \['re:query'\]"):
        _recipe(rules=[Rule(match="re:query", spec=SpecModel(bits=8))], layers=[]).to_plan(tiny_bert)


def test_rule_naming_a_missing_unit_is_an_error(tiny_bert) -> None:
    recipe = _recipe(rules=[Rule(match="encoder.layer.0.attention.self.query", spec=SpecModel(bits=8)),
                            Rule(match="encoder.layer.7.mlp.fc1", spec=SpecModel(bits=4))])
    with pytest.raises(RecipeError, match=r"match no unit .*'encoder\.layer\.7\.mlp\.fc1'"):
        recipe.to_plan(tiny_bert)


def test_shadowed_rule_is_an_error(tiny_bert) -> None:
    """A rule whose every unit is taken by an earlier rule matches nothing: reported like a missing unit."""
    recipe = _recipe(rules=[Rule(match="re:.*", spec=SpecModel(bits=8)),
                            Rule(match="encoder.layer.0.output.dense", spec=SpecModel(bits=4))], layers=[])
    with pytest.raises(RecipeError, match=r"\['encoder\.layer\.0\.output\.dense'\]"):
        recipe.to_plan(tiny_bert)


def test_plan_errors_become_recipe_errors(tiny_bert) -> None:
    with pytest.raises(RecipeError, match=r"recipe layers \[4\] do not exist; tiny-bert has layers 0..3"):
        _recipe(layers=[LayerRule(layer=4, heads_kept=1)]).to_plan(tiny_bert)
    with pytest.raises(RecipeError, match="heads_kept 9 > 4 heads"):
        _recipe(layers=[LayerRule(layer=1, heads_kept=9)]).to_plan(tiny_bert)
    with pytest.raises(RecipeError, match="sparsity 0.5"):
        _recipe(rules=[Rule(match="re:.*query", spec=SpecModel(sparsity=0.3, pattern="2:4"))]).to_plan(tiny_bert)
    with pytest.raises(RecipeError, match="appear in two sharing groups"):
        _recipe(sharing={"groups": [[0, 1], [1, 2]]}).to_plan(tiny_bert)
    with pytest.raises(RecipeError, match=r"names layer\(s\) \[5\]"):
        _recipe(sharing={"groups": [[0, 5]]}).to_plan(tiny_bert)


def _yaml(**changes) -> str:
    data = yaml.safe_load(_recipe().to_yaml())
    for k, v in changes.items():
        data[k] = v
    return yaml.safe_dump(data)


@pytest.mark.parametrize("text, pattern", [
    (_yaml(optimizer="adam"), r"optimizer: unknown key \(remove it or check its spelling\)"),
    (_yaml(rules=[{"match": "x", "spec": {"bits": 8, "bitz": 4}}]), r"rules\.0\.spec\.bitz: unknown key"),
    (_yaml(layers=[{"layer": 0, "head_kept": 2}]), r"layers\.0\.head_kept: unknown key"),
    (_yaml(model={"id": "m", "sha": "x"}), r"model\.sha: unknown key"),
    (_yaml(slimformer_recipe=3), "recipe version 3 is newer than this slimformer reads"),
    (_yaml(slimformer_recipe=0), "unsupported recipe version 0"),
    (_yaml(rules=[{"match": "x", "spec": {"bits": 5}}]), r"rules\.0\.spec\.bits"),
    (_yaml(rules=[{"match": "x", "spec": {"bits": 4, "method": "adaround"}}]), r"rules\.0\.spec\.method"),
    (_yaml(rules=[{"match": "re:(", "spec": {}}]), r"invalid regex '\('"),
    (_yaml(layers=[{"layer": -1}]), r"layers\.0\.layer"),
    (_yaml(sharing={"groups": [[0, 1]], "scope": "heads"}), r"sharing\.scope"),
    ("slimformer_recipe: 1\nmodel: {id: m}\nrules: [\n", "not valid YAML"),
    ("model: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("", "a recipe is a YAML mapping"),
    ("slimformer_recipe: 1\n", r"model: Field required"),
])
def test_invalid_recipes_raise_recipe_error(text, pattern) -> None:
    with pytest.raises(RecipeError, match=pattern):
        Recipe.from_yaml(text, source="my.yaml")
    with pytest.raises(RecipeError, match="^my.yaml: "):
        Recipe.from_yaml(text, source="my.yaml")


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"recipe file .*nope\.yaml does not exist"):
        Recipe.load(tmp_path / "nope.yaml")


def test_recipe_is_frozen() -> None:
    r = _recipe()
    with pytest.raises(Exception, match="frozen"):
        r.hardware_profile = "other"  # type: ignore[misc]
