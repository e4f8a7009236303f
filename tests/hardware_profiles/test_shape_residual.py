"""The shape-local whole-graph residual (few-shot fit at calibration): the fit recovers known coefficients, stays
physical on wild data, prices only at its own shape, and the per-call overhead smoothing; plus the improvement on
stored real measurements (no timing)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from slimformer.compression.plan import CompressionPlan, LayerSpec
from slimformer.errors import ConfigError
from slimformer.hardware_profiles import load_profile, save_profile
from slimformer.hardware_profiles.predict import predict
from slimformer.hardware_profiles.profile import ShapeResidual
from slimformer.hardware_profiles.sampling import smooth_overheads
from slimformer.hardware_profiles.shape_residual import (
    ShapePoint,
    apply_shape_residual,
    fit_shape_residual,
    group_of,
    local_for,
)

SHIPPED = "amd-epyc-avx512-1t-ort1-32"
TRUE = {"matmul": 1.2, "matmulnbits:4": 0.8, "attention": 1.5, "elementwise": 0.9}


def _points(n: int, const: float, per_head: float, noise: float = 0.0, seed: int = 0) -> list[ShapePoint]:
    rng = np.random.default_rng(seed)
    pts = []
    for i in range(n):
        groups = {g: float(rng.uniform(0.5, 10.0)) for g in TRUE}
        heads = float(rng.integers(6, 73))
        ms = sum(TRUE[g] * v for g, v in groups.items()) + const + per_head * heads
        pts.append(ShapePoint(f"p{i}", groups, heads, ms * (1 + noise * rng.standard_normal())))
    return pts


def test_fit_recovers_known_scales_constant_and_head_cost() -> None:
    res = fit_shape_residual(_points(24, const=0.3, per_head=0.01), 1, 128, ridge=0.0)
    assert (res.batch, res.seq) == (1, 128) and res.rmse_rel < 1e-6 and len(res.fitted_on) == 24
    assert res.scale == pytest.approx(TRUE, abs=1e-3)
    assert res.const_ms == pytest.approx(0.3, abs=1e-3) and res.per_head_ms == pytest.approx(0.01, abs=1e-4)
    p = _points(1, const=0.3, per_head=0.01, seed=9)[0]
    assert apply_shape_residual(res, {"matmul": p.groups["matmul"], "matmulnbits:4:32": p.groups["matmulnbits:4"],
                                      "attention": p.groups["attention"], "layernorm": p.groups["elementwise"]},
                                p.heads) == pytest.approx(p.measured_ms, rel=1e-4)


def test_ridge_keeps_a_group_the_points_barely_use_near_one() -> None:
    pts = [ShapePoint(p.name, {**p.groups, "embedding": 1e-4}, p.heads, p.measured_ms * 1.003)
           for p in _points(12, const=0.2, per_head=0.0, noise=0.01)]
    res = fit_shape_residual(pts, 1, 17)
    assert res.scale["embedding"] == pytest.approx(1.0, abs=0.05)  # no information: the prior wins
    assert 1.25 <= res.scale["attention"] <= 1.5 and res.rmse_rel < 0.03  # informed, shrunk a little towards 1


def test_fit_on_wild_data_stays_physical_and_saves(tmp_path: Path) -> None:
    pts = [ShapePoint(p.name, p.groups, p.heads, 10 * p.measured_ms) for p in _points(10, 0.0, 0.0)]
    res = fit_shape_residual(pts, 1, 128)
    assert all(0.5 <= s <= 2.0 for s in res.scale.values()) and res.const_ms >= 0 and res.per_head_ms >= 0
    prof = load_profile(SHIPPED)
    lm = prof.latency_model.model_copy(update={"local_residual": {"hf": [res]}})
    new = prof.model_copy(update={"latency_model": lm})
    assert new.physical_problems() == []
    assert load_profile(save_profile(new, tmp_path / "p.yaml")).latency_model.local_residual["hf"] == [res]
    with pytest.raises(ValueError, match="at least one timed model"):
        fit_shape_residual([], 1, 8)


def test_unphysical_local_residual_is_never_written(tmp_path: Path) -> None:
    prof = load_profile(SHIPPED)
    bad = ShapeResidual(batch=1, seq=128, scale={"matmul": 3.0}, const_ms=-1.0)
    new = prof.model_copy(update={"latency_model": prof.latency_model.model_copy(
        update={"local_residual": {"hf": [bad]}})})
    with pytest.raises(ConfigError, match=r"local_residual\[hf\]\[1x128\]\.scale\[matmul\] = 3.0 is outside"):
        save_profile(new, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()
    assert any("const_ms" in p for p in new.physical_problems())


def test_shipped_profile_keeps_its_fingerprint() -> None:
    # recipes record it (examples/recipes/vit-speed.yaml); the new optional section must not change old profiles
    assert load_profile(SHIPPED).fingerprint == "b6f2ca19cecb"


def test_predict_uses_the_local_residual_at_its_shape_only(tiny_bert) -> None:
    prof = load_profile(SHIPPED)
    plan = CompressionPlan(layers={0: LayerSpec(heads_kept=1)})
    heads = sum(i.num_heads for i in tiny_bert.layers) - (tiny_bert.layers[0].num_heads - 1)
    before8, before16 = predict(tiny_bert, plan, 1, 8, prof), predict(tiny_bert, plan, 1, 16, prof)
    local = ShapeResidual(batch=1, seq=8, scale={}, const_ms=1.0, per_head_ms=0.5)
    prof = prof.model_copy(update={"latency_model": prof.latency_model.model_copy(
        update={"local_residual": {tiny_bert.family: [local]}})})
    at8 = predict(tiny_bert, plan, 1, 8, prof)
    assert at8.ms == pytest.approx(before8.kernel_ms + 1.0 + 0.5 * heads)
    assert predict(tiny_bert, plan, 1, 16, prof).ms == pytest.approx(before16.ms)  # other shape: global residual
    assert local_for([local], 1, 8) is local and local_for([local], 8, 8) is None


def test_groups_of_breakdown_classes() -> None:
    assert [group_of(c) for c in ("matmul", "matmulnbits:4:32", "lowrank|matmulnbits:8:32", "attention", "gelu",
                                  "layernorm", "gather_block_quantized:4:32", "fp16_gather", "dynamic_int8")] == [
        "matmul", "matmulnbits:4", "lowrank", "attention", "elementwise", "elementwise", "embedding", "embedding",
        "dynamic_int8"]


def test_sampled_plans_are_not_the_validation_plans(tiny_bert) -> None:
    from slimformer.hardware_profiles.residual_fit import sampled_plans
    from slimformer.hardware_profiles.validate import validation_plans

    samples = sampled_plans(tiny_bert, 8)
    held, _ = validation_plans(tiny_bert, 60)
    assert list(samples) == [f"sample{i:02d}" for i in range(8)] and not set(samples) & set(held)
    assert not [s for s in samples.values() if any(s == h for h in held.values())]
    assert sampled_plans(tiny_bert, 5) == dict(list(samples.items())[:5])  # quick's are full's first five
    assert random.Random(0).random() == random.Random(0).random()


def test_overhead_smoothing_drops_a_one_chunk_spike_and_follows_a_step() -> None:
    assert smooth_overheads([5.0, 5.1, 12.0, 4.9, 5.0]) == pytest.approx([5.05, 5.0, 5.0, 5.0, 4.95], abs=0.06)
    step = smooth_overheads([5.0] * 6 + [7.0] * 6)
    assert step[:4] == [5.0] * 4 and step[-4:] == [7.0] * 4
    assert smooth_overheads([]) == [] and smooth_overheads([3.0]) == [3.0]
