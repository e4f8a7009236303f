"""examples/recipes/minilm-speed.yaml, the speed benchmark's plan (issue 13): within 15% of the fp32 ONNX bytes,
priced by the calibrated 1-thread profile at <= 0.40x fp32 and <= 0.75x the plan onnxruntime's dynamic int8
quantisation runs (int8 kernels on every encoder linear, fp32 embeddings), and carrying the recovery settings
that `apply --recover` reproduces its weights with."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from slimformer.compression.memory import plan_memory, set_deploy
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.hardware_profiles.predict import predict
from slimformer.hardware_profiles.profile import load_profile
from slimformer.recovery import RecoveryConfig

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "minilm-speed.yaml"


@pytest.mark.slow
def test_speed_recipe_fits_and_is_priced_fast(minilm) -> None:
    from slimformer.export import graph_overhead_bytes

    recipe = Recipe.load(RECIPE)
    assert recipe.recovery is not None and recipe.recovery.steps >= 1
    cfg = RecoveryConfig.from_recorded(recipe.recovery.settings)  # what `apply --recover` runs
    assert cfg.step_budget == recipe.recovery.steps
    profile = load_profile("amd-epyc-avx512-1t-ort1-32")
    plan = recipe.to_plan(minilm)
    ort_int8 = CompressionPlan({u.name: UnitSpec(bits=8, kernel="int8") for u in minilm.units if u.role != "embedding"})
    fp32_ms = predict(minilm, CompressionPlan(), 1, 128, profile).ms
    ms = predict(minilm, plan, 1, 128, profile).ms
    assert ms <= 0.40 * fp32_ms and ms <= 0.75 * predict(minilm, ort_int8, 1, 128, profile).ms
    fresh = copy.copy(minilm)  # deploy pricing is set per adapter: leave the session's shared one alone
    set_deploy(fresh, "onnx", graph_overhead_bytes(fresh))
    mem = plan_memory(fresh, plan)
    assert mem.total_bytes <= 0.15 * mem.fp32_bytes
