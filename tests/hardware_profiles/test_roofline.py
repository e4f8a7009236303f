from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest

from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec, sharing_pattern
from slimformer.errors import ConfigError, PlanError
from slimformer.hardware_profiles import HardwareProfile, default_profile_name, load_profile
from slimformer.hardware_profiles.roofline import (
    RooflineEstimate,
    estimate_latency,
    flops_proxy,
    latency_breakdown,
)
from slimformer.models.base import LayerInfo, Unit

HIDDEN, HEADS, HEAD_DIM, INTER, VOCAB, MAX_POS = 128, 4, 32, 512, 1000, 64

PROFILE = HardwareProfile(
    name="toy", cpu="toy", cores=4, threads=4, runtime_version="test",
    peak_gflops_fp32=100.0, mem_bandwidth_gbs=20.0, per_op_overhead_us=2.0, created=date(2026, 1, 1),
)


def toy_model(num_layers: int = 2, fused_qkv: bool = False) -> tuple[list[Unit], list[LayerInfo]]:
    """A BERT-like encoder described by hand: word + position embeddings, `num_layers` blocks."""
    units = [
        Unit("embeddings.word", "embedding", None, (VOCAB, HIDDEN), False),
        Unit("embeddings.position", "embedding", None, (MAX_POS, HIDDEN), False),
    ]
    layers = []
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        if fused_qkv:
            qkv = (f"{p}.attn.qkv",)
            units.append(Unit(qkv[0], "qkv", i, (3 * HIDDEN, HIDDEN), True))
        else:
            qkv = (f"{p}.attn.query", f"{p}.attn.key", f"{p}.attn.value")
            for name, role in zip(qkv, ("query", "key", "value"), strict=True):
                units.append(Unit(name, role, i, (HIDDEN, HIDDEN), True))
        units += [
            Unit(f"{p}.attn.out", "attn_out", i, (HIDDEN, HIDDEN), True),
            Unit(f"{p}.ffn.in", "ffn_in", i, (INTER, HIDDEN), True),
            Unit(f"{p}.ffn.out", "ffn_out", i, (HIDDEN, INTER), True),
        ]
        layers.append(LayerInfo(
            index=i, path=p, attention_path=f"{p}.attn", heads_attr="num_heads", num_heads=HEADS,
            head_dim=HEAD_DIM, intermediate=INTER, qkv_units=qkv, attn_out_unit=f"{p}.attn.out",
            ffn_in_unit=f"{p}.ffn.in", ffn_out_unit=f"{p}.ffn.out",
            attention_scope=(f"{p}.attn",), ffn_scope=(f"{p}.ffn",),
        ))
    return units, layers


UNITS, LAYERS = toy_model()
LINEARS = [u for u in UNITS if u.kind == "linear"]


def est(plan: CompressionPlan, **kw: int) -> RooflineEstimate:
    return estimate_latency(UNITS, LAYERS, plan, PROFILE, **kw)


def all_linear(spec: UnitSpec) -> CompressionPlan:
    return CompressionPlan(units={u.name: spec for u in LINEARS})


def all_layers(**kw: int) -> CompressionPlan:
    return CompressionPlan(layers={info.index: LayerSpec(**kw) for info in LAYERS})


def test_identity_estimate_is_positive_and_labelled() -> None:
    e = est(CompressionPlan())
    assert e.ms > 0 and e.flops > 0 and e.weight_bytes > 0 and e.activation_bytes > 0
    assert e.compute_ms > 0 and e.memory_ms > 0 and e.overhead_ms > 0
    assert "estimate" in e.label
    assert max(e.compute_ms, e.memory_ms) + e.overhead_ms <= e.ms
    assert e.ms <= e.compute_ms + e.memory_ms + e.overhead_ms


def test_breakdown_sums_to_the_estimate() -> None:
    plans = (CompressionPlan(), all_linear(UnitSpec(rank=8, bits=4, group_size=32)), all_layers(heads_kept=2))
    for plan in plans:
        e = est(plan)
        ops = latency_breakdown(UNITS, LAYERS, plan, PROFILE)
        assert sum(op.ms for op in ops) == pytest.approx(e.ms)
        assert sum(op.flops for op in ops) == pytest.approx(e.flops)
        assert sum(op.weight_bytes for op in ops) == pytest.approx(e.weight_bytes)
        assert e.overhead_ms == pytest.approx(len(ops) * PROFILE.per_op_overhead_us / 1000)


def test_flops_proxy_matches_hand_count() -> None:
    batch, seq = 2, 16
    m = batch * seq
    linear = 2 * m * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTER)
    attention = 2 * 2 * batch * HEADS * seq * seq * HEAD_DIM
    expected = len(LAYERS) * (linear + attention)
    assert flops_proxy(UNITS, LAYERS, CompressionPlan(), batch=batch, seq=seq) == expected
    assert est(CompressionPlan(), batch=batch, seq=seq).flops == expected
    fused_units, fused_layers = toy_model(fused_qkv=True)
    assert flops_proxy(fused_units, fused_layers, CompressionPlan(), batch=batch, seq=seq) == expected


def test_int8_is_faster_than_fp32_when_memory_bound() -> None:
    fp32, int8, int4 = (all_linear(UnitSpec(bits=b)) for b in (32, 8, 4))
    # batch 1, one token: every linear is memory bound, so fewer weight bytes -> less time
    assert est(int8, batch=1, seq=1).ms < est(fp32, batch=1, seq=1).ms
    assert est(int4, batch=1, seq=1).ms < est(int8, batch=1, seq=1).ms
    # quantisation never adds time (dequantisation only costs the packed-weight traffic) and keeps fp32 flops
    assert est(int8).ms <= est(fp32).ms
    assert est(int8).flops == est(fp32).flops


def test_weight_bytes_follow_bits_and_scales() -> None:
    name = LINEARS[0].name  # a 128 x 128 query with bias
    base = est(CompressionPlan()).weight_bytes
    n = HIDDEN * HIDDEN
    int8 = est(CompressionPlan(units={name: UnitSpec(bits=8)})).weight_bytes
    assert base - int8 == pytest.approx(4 * n - (n + 4 * HIDDEN))  # 1 byte/weight + one fp32 scale per row
    int4_g32 = est(CompressionPlan(units={name: UnitSpec(bits=4, group_size=32)})).weight_bytes
    assert base - int4_g32 == pytest.approx(4 * n - (0.5 * n + 4 * HIDDEN * (HIDDEN // 32)))
    fp16 = est(CompressionPlan(units={name: UnitSpec(bits=16)})).weight_bytes
    assert base - fp16 == pytest.approx(2 * n)


def test_small_rank_is_faster_than_full() -> None:
    full = est(CompressionPlan())
    low = est(all_linear(UnitSpec(rank=8)))
    assert low.ms < full.ms
    assert low.flops < full.flops


def test_rank_above_break_even_is_slower_than_dense() -> None:
    # ffn_in is 512 x 128: break-even rank = 512*128 / (512+128) = 102.4
    names = [u.name for u in LINEARS if u.role == "ffn_in"]
    m = 128
    below = CompressionPlan(units={n: UnitSpec(rank=100) for n in names})
    above = CompressionPlan(units={n: UnitSpec(rank=120) for n in names})
    dense_flops = flops_proxy(UNITS, LAYERS, CompressionPlan())
    assert flops_proxy(UNITS, LAYERS, below) < dense_flops < flops_proxy(UNITS, LAYERS, above)
    assert flops_proxy(UNITS, LAYERS, above) - dense_flops == pytest.approx(
        len(names) * 2 * m * (120 * (INTER + HIDDEN) - INTER * HIDDEN)
    )
    assert est(above).ms > est(CompressionPlan()).ms
    # every linear factorised at (almost) full rank: two GEMMs instead of one, clearly slower
    assert est(all_linear(UnitSpec(rank=HIDDEN))).ms > est(CompressionPlan()).ms


def test_rank_is_clamped_to_the_matrix() -> None:
    assert est(all_linear(UnitSpec(rank=10_000))) == est(all_linear(UnitSpec(rank=HIDDEN)))


def test_fewer_heads_is_monotonically_faster_and_halves_attention() -> None:
    times = [est(all_layers(heads_kept=h)).ms for h in range(HEADS, 0, -1)]
    assert all(a > b for a, b in zip(times, times[1:], strict=False))
    assert est(all_layers(heads_kept=HEADS)) == est(CompressionPlan())

    def attention(plan: CompressionPlan) -> tuple[float, float]:
        ops = [op for op in latency_breakdown(UNITS, LAYERS, plan, PROFILE) if op.kind == "attention"]
        return sum(op.flops for op in ops), sum(op.activation_bytes for op in ops)

    full_flops, full_bytes = attention(CompressionPlan())
    half_flops, half_bytes = attention(all_layers(heads_kept=HEADS // 2))
    assert half_flops == pytest.approx(full_flops / 2)
    assert half_bytes == pytest.approx(full_bytes / 2)


def test_fewer_heads_shrinks_projections_including_fused_qkv() -> None:
    for units, layers in (toy_model(), toy_model(fused_qkv=True)):
        full = flops_proxy(units, layers, CompressionPlan())
        half = flops_proxy(units, layers, all_layers(heads_kept=HEADS // 2))
        m = 128
        attn_linear = 2 * m * 4 * HIDDEN * HIDDEN
        attn_mm = 2 * 2 * HEADS * m * m * HEAD_DIM
        assert full - half == pytest.approx(len(layers) * (attn_linear + attn_mm) / 2)


def test_fewer_neurons_is_faster() -> None:
    times = [est(all_layers(neurons_kept=n)).ms for n in (INTER, 384, 256, 64)]
    assert all(a > b for a, b in zip(times, times[1:], strict=False))
    m = 128
    full = flops_proxy(UNITS, LAYERS, CompressionPlan())
    saved = full - flops_proxy(UNITS, LAYERS, all_layers(neurons_kept=256))
    assert saved == pytest.approx(len(LAYERS) * 2 * m * 2 * HIDDEN * 256)


def test_sparsity_does_not_change_the_estimate() -> None:
    base = est(CompressionPlan())
    assert est(all_linear(UnitSpec(sparsity=0.7))) == base
    assert est(all_linear(UnitSpec(sparsity=0.5, pattern="2:4"))) == base
    int8 = est(all_linear(UnitSpec(bits=8)))
    assert est(all_linear(UnitSpec(bits=8, sparsity=0.9))) == int8


def test_sharing_does_not_change_the_estimate() -> None:
    shared = CompressionPlan(sharing=sharing_pattern("pairs", len(LAYERS)))
    assert est(shared) == est(CompressionPlan())


def test_bigger_batch_and_longer_sequences_take_longer() -> None:
    assert est(CompressionPlan(), batch=32).ms > est(CompressionPlan(), batch=1).ms
    assert est(CompressionPlan(), seq=256).ms > est(CompressionPlan(), seq=128).ms


def test_embeddings_are_costed() -> None:
    e = est(CompressionPlan(), batch=1, seq=1)
    no_emb = estimate_latency(LINEARS, LAYERS, CompressionPlan(), PROFILE, batch=1, seq=1)
    assert e.ms > no_emb.ms
    # gathered rows only: bigger vocabulary, same cost
    bigger = [replace(u, shape=(50 * VOCAB, HIDDEN)) if u.role == "embedding" else u for u in UNITS]
    assert estimate_latency(bigger, LAYERS, CompressionPlan(), PROFILE) == est(CompressionPlan())
    int8 = CompressionPlan(units={"embeddings.word": UnitSpec(bits=8)})
    assert est(int8).weight_bytes < est(CompressionPlan()).weight_bytes


def test_more_layers_take_longer() -> None:
    units6, layers6 = toy_model(num_layers=6)
    assert estimate_latency(units6, layers6, CompressionPlan(), PROFILE).ms > est(CompressionPlan()).ms


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(PlanError, match="heads_kept 8 exceeds its 4 heads"):
        est(all_layers(heads_kept=8))
    with pytest.raises(PlanError, match="neurons_kept"):
        est(all_layers(neurons_kept=INTER + 1))
    with pytest.raises(ConfigError, match="batch and seq must be >= 1"):
        est(CompressionPlan(), batch=0)


def test_shipped_profile_gives_an_estimate() -> None:
    e = estimate_latency(UNITS, LAYERS, CompressionPlan(), load_profile(default_profile_name()))
    assert e.ms > 0 and e.label == "estimate (roofline)"
