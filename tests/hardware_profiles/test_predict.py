"""The calibrated latency model: v2 round trip, physics-shaped monotonicity, sparsity, errors, speed."""

from __future__ import annotations

import warnings
from datetime import date
from pathlib import Path

import pytest
import yaml

from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec
from slimformer.errors import ConfigError, SlimformerWarning
from slimformer.evaluators.latency import resolved_source, source_label
from slimformer.hardware_profiles import load_profile, save_profile
from slimformer.hardware_profiles.machine import mismatch, warn_if_mismatched
from slimformer.hardware_profiles.predict import predict, table_us
from slimformer.hardware_profiles.profile import (
    Fit,
    HardwareProfile,
    KernelTable,
    LatencyModel,
    Noise,
    Residual,
    ValidationResult,
)

LIN = ["1", "K*N", "K", "N"]


def _table(scale: float) -> KernelTable:
    # per-M fits: at M=1 weight-bytes bound, at M=64 compute bound (coefficients grow with M)
    return KernelTable(m_values=[1, 16, 64], fits=[
        Fit(features=LIN, coef=[2.0, 1e-4 * scale, 0.001, 0.001]),
        Fit(features=LIN, coef=[2.5, 4e-4 * scale, 0.002, 0.004]),
        Fit(features=LIN, coef=[3.0, 1.5e-3 * scale, 0.004, 0.02]),
    ])


def calibrated_profile(**changes: object) -> HardwareProfile:
    """A hand-made calibrated profile: int4 tables cheaper than int8, cheaper than fp32."""
    lm = LatencyModel(
        linear={"matmul": _table(1.0), "dequant_gemm:8:row": _table(0.8), "matmulnbits:8:32": _table(0.9),
                "matmulnbits:4:32": _table(0.6), "matmulnbits:4:128": _table(0.55)},
        embedding={"gather": Fit(features=["1", "rows*width"], coef=[1.0, 1e-4]),
                   "gather_block_quantized:4:32": Fit(features=["1", "rows*width"], coef=[1.5, 2e-4])},
        attention=Fit(features=["1", "BH*S*S*D", "BH*S*S", "BH*S*D"], coef=[5.0, 1e-5, 1e-3, 1e-3]),
        elementwise={k: Fit(features=["1", "elements"], coef=[1.0, 1e-4]) for k in ("add", "layernorm", "gelu")},
        residual={"hf": Residual(per_layer_ms=0.01, per_layer_token_us=0.5, rmse_rel=0.02)},
        flops_ms_per_gflop=10.0, call_overhead_us=5.0)
    fields: dict[str, object] = dict(
        name="toy-ort", cpu="Toy CPU", cores=4, threads=1, runtime="onnxruntime", runtime_version="0.0.1",
        peak_gflops_fp32=50.0, mem_bandwidth_gbs=10.0, per_op_overhead_us=1.0, created=date(2026, 1, 2),
        latency_model=lm, peak_gflops={"matmul": 50.0}, noise=Noise(median_rel_iqr=0.02, p95_rel_iqr=0.1, repeats=9),
        validation=[ValidationResult(model="m", batch=1, seq=8, configs=3, mape=0.04, within_5=0.7, within_10=1.0,
                                     p95_error=0.08, kendall_tau=0.9, noise_floor=0.01, flops_mape=0.2,
                                     flops_within_10=0.3, flops_kendall_tau=0.6)])
    fields.update(changes)
    return HardwareProfile(**fields)


def uniform(adapter, **spec: object) -> CompressionPlan:
    return CompressionPlan(units={u.name: UnitSpec(**spec) for u in adapter.units})  # type: ignore[arg-type]


def test_v2_round_trip_keeps_the_model_and_fingerprint(tmp_path: Path) -> None:
    p = calibrated_profile()
    out = save_profile(p, tmp_path / "toy.yaml")
    back = load_profile(out)
    assert back == p
    assert back.fingerprint == p.fingerprint and back.calibrated
    assert p.version.startswith("v2-2026-01-02-")
    raw = yaml.safe_load(out.read_text())
    assert raw["schema_version"] == 2 and "!!python" not in out.read_text()
    # the fingerprint follows what prices plans, not the notes or validation results
    assert calibrated_profile(notes="x", validation=[]).fingerprint == p.fingerprint
    assert calibrated_profile(peak_gflops_fp32=51.0).fingerprint != p.fingerprint


def test_v1_document_loads_as_uncalibrated(tmp_path: Path) -> None:
    raw = calibrated_profile().model_dump(mode="json", exclude_none=True)
    for key in ("latency_model", "noise", "validation", "peak_gflops", "providers", "caches"):
        raw.pop(key, None)
    raw["schema_version"] = 1
    path = tmp_path / "v1.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = load_profile(path)
    assert p.schema_version == 2 and not p.calibrated
    assert load_profile("amd-epyc-avx512-2t-torch").schema_version == 2


def test_corrupt_latency_model_is_a_one_line_config_error(tmp_path: Path) -> None:
    raw = calibrated_profile().model_dump(mode="json", exclude_none=True)
    raw["latency_model"]["linear"]["matmul"]["fits"][0]["coef"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid: latency_model\.linear\.matmul") as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_table_is_monotonic_in_k_n_and_m() -> None:
    t = _table(1.0)
    for m in (1, 5, 16, 40, 64, 200):
        prev = 0.0
        for k, n in ((16, 16), (16, 64), (64, 64), (64, 256), (384, 1536)):
            us = table_us(t, m, k, n)
            assert us >= prev
            prev = us
    for k, n in ((16, 16), (384, 1536)):
        times = [table_us(t, m, k, n) for m in (1, 2, 8, 16, 33, 64, 128, 512)]
        assert times == sorted(times)


def test_more_work_never_predicts_faster(tiny_bert) -> None:
    prof = calibrated_profile()
    base = predict(tiny_bert, CompressionPlan(), 1, 16, prof)
    assert base.ms > 0 and base.low < base.ms < base.high
    assert base.roofline_ms < base.ms and base.flops > 0
    assert predict(tiny_bert, CompressionPlan(), 1, 32, prof).ms >= base.ms
    assert predict(tiny_bert, CompressionPlan(), 2, 16, prof).ms >= base.ms
    fewer_heads = CompressionPlan(layers={i.index: LayerSpec(heads_kept=1, neurons_kept=8) for i in tiny_bert.layers})
    assert predict(tiny_bert, fewer_heads, 1, 16, prof).ms <= base.ms
    # the toy tables say lower bits are cheaper at equal shape, so the prediction must agree
    int8 = predict(tiny_bert, uniform(tiny_bert, bits=8, group_size=32), 1, 16, prof).ms
    int4 = predict(tiny_bert, uniform(tiny_bert, bits=4, group_size=32), 1, 16, prof).ms
    assert int4 <= int8 <= base.ms


def test_unstructured_sparsity_and_sharing_are_no_faster_than_dense(tiny_bert) -> None:
    prof = calibrated_profile()
    for bits in (32, 8, 4):
        dense = predict(tiny_bert, uniform(tiny_bert, bits=bits, group_size=32 if bits < 32 else None), 1, 16, prof)
        sparse = predict(tiny_bert, uniform(tiny_bert, bits=bits, group_size=32 if bits < 32 else None,
                                            sparsity=0.5), 1, 16, prof)
        assert sparse.ms >= dense.ms
        assert sparse.breakdown == dense.breakdown


def test_kernel_classes_follow_the_exporters_choice(tiny_bert) -> None:
    prof = calibrated_profile()
    assert set(predict(tiny_bert, uniform(tiny_bert, bits=8), 1, 8, prof).breakdown) >= {"dequant_gemm:8:row"}
    assert "matmulnbits:4:32" in predict(tiny_bert, uniform(tiny_bert, bits=4, group_size=32), 1, 8, prof).breakdown
    # fp16 linears are fp32 MatMuls once ORT folds the Cast
    assert "matmul" in predict(tiny_bert, uniform(tiny_bert, bits=16), 1, 8, prof).breakdown


def test_uncalibrated_profile_and_sources() -> None:
    torch_profile = load_profile("amd-epyc-avx512-2t-torch")
    with pytest.raises(ConfigError, match="no calibrated latency model.*slimformer calibrate"):
        resolved_source("calibrated", torch_profile)
    assert resolved_source("auto", torch_profile) == "estimate"
    assert resolved_source("auto", calibrated_profile()) == "calibrated"
    assert resolved_source("estimate", calibrated_profile()) == "estimate"
    assert source_label("auto", calibrated_profile()).startswith("calibrated")
    assert "estimate (roofline)" in source_label("auto", torch_profile)


def test_mismatched_profile_warns_one_line() -> None:
    prof = calibrated_profile(cpu="Some Other CPU", threads=1)
    msg = mismatch(prof, threads=4)
    assert msg is not None and "\n" not in msg
    assert "Some Other CPU" in msg and "4 thread(s)" in msg and "onnxruntime" in msg
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one plain line, never a Python warning (file:line, said twice)
        assert warn_if_mismatched(prof, threads=4, log=said.append) == msg
    assert said == [msg]
    with warnings.catch_warnings(record=True) as caught:  # no log: a notice, which the CLI prints once
        warnings.simplefilter("always")
        warn_if_mismatched(prof, threads=4)
    assert [(w.category, str(w.message)) for w in caught] == [(SlimformerWarning, msg)]


def test_residual_scales_kernel_families_and_glue_follows_heads(tiny_bert) -> None:
    from slimformer.hardware_profiles.residual import apply_residual, glue_features, kernel_family

    assert kernel_family("matmulnbits:4:32") == "matmulnbits:4" and kernel_family("attention") == "other"
    full = glue_features(tiny_bert, CompressionPlan(), 1, 16)
    one = glue_features(tiny_bert, CompressionPlan(layers={i.index: LayerSpec(heads_kept=1)
                                                           for i in tiny_bert.layers}), 1, 16)
    assert one[0] < full[0] and one[1] < full[1] and one[2:] == full[2:]
    res = Residual(class_scale={"matmul": 1.5}, per_score_ns=2.0, per_layer_ms=0.1)
    ms = apply_residual(res, {"matmul": 1.0, "attention": 0.5}, full)
    assert ms == pytest.approx(1.5 + 0.5 + 2.0 * full[0] + 0.1 * full[3])


def test_shared_layers_are_priced_with_their_representatives_specs(tiny_bert) -> None:
    """apply_plan runs layer 1 with layer 0's modules under block sharing; predict must price that model,
    not layer 1's own (ignored) entries."""
    from slimformer.compression.plan import SharingSpec

    prof = calibrated_profile()
    l0 = [u.name for u in tiny_bert.units if u.layer == 0]
    l1 = [u.name for u in tiny_bert.units if u.layer == 1]
    sharing = SharingSpec(groups=((0, 1),), scope="block")
    own = {n: UnitSpec(bits=4, group_size=32) for n in l0} | {n: UnitSpec(bits=8) for n in l1}
    shared = predict(tiny_bert, CompressionPlan(own, sharing=sharing), 1, 16, prof)
    explicit = CompressionPlan({n: UnitSpec(bits=4, group_size=32) for n in l0 + l1}, sharing=sharing)
    assert shared.ms == pytest.approx(predict(tiny_bert, explicit, 1, 16, prof).ms, rel=1e-12)
    assert "dequant_gemm:8:row" not in shared.breakdown  # layer 1's int8 entries are never built


def test_low_rank_factors_are_their_own_residual_family(tiny_bert) -> None:
    """A rank-r linear's two MatMuls are priced under 'lowrank|<class>'; the 'lowrank' scale applies to them
    only, and a profile fitted before the family existed prices them with their kernel family's scale."""
    from slimformer.hardware_profiles.residual import LOWRANK_PREFIX, kernel_family

    lin = [u for u in tiny_bert.units if u.role != "embedding"]
    plan = CompressionPlan(units={u.name: UnitSpec(rank=8) for u in lin})
    old = calibrated_profile()  # residual without class scales
    p = predict(tiny_bert, plan, 1, 16, old)
    low = {k: v for k, v in p.breakdown.items() if k.startswith(LOWRANK_PREFIX)}
    assert set(low) == {LOWRANK_PREFIX + "matmul"} and kernel_family(LOWRANK_PREFIX + "matmul") == "lowrank"
    assert "matmul" not in p.breakdown  # every linear is low rank here; the embeddings are gathers

    def with_scales(**scales: float) -> HardwareProfile:
        lm = old.latency_model.model_copy(deep=True)
        lm.residual["hf"] = lm.residual["hf"].model_copy(update={"class_scale": scales})
        return old.model_copy(update={"latency_model": lm})

    base = predict(tiny_bert, plan, 1, 16, with_scales(matmul=1.0)).ms
    # no 'lowrank' scale: the factors take the matmul family's scale (the behaviour of older profiles)
    assert predict(tiny_bert, plan, 1, 16, with_scales(matmul=1.5)).ms == pytest.approx(base + 0.5 * sum(low.values()))
    # a 'lowrank' scale overrides it for the factors and leaves dense matmuls alone
    assert predict(tiny_bert, plan, 1, 16, with_scales(matmul=1.5, lowrank=0.5)).ms == pytest.approx(
        base - 0.5 * sum(low.values()))
    dense = CompressionPlan()
    assert predict(tiny_bert, dense, 1, 16, with_scales(matmul=1.0, lowrank=0.5)).ms == pytest.approx(
        predict(tiny_bert, dense, 1, 16, with_scales(matmul=1.0)).ms)


def test_fused_attention_is_priced_by_its_own_fit_with_a_fallback(tiny_bert) -> None:
    """Exports lower attention to MultiHeadAttention: a profile with `attention_mha` prices the core with it;
    one calibrated before it existed prices it with the decomposed core's fit (same prediction as before)."""
    old = calibrated_profile()
    assert old.latency_model is not None and old.latency_model.attention is not None
    same = calibrated_profile(latency_model=old.latency_model.model_copy(
        update={"attention_mha": old.latency_model.attention}))
    half = calibrated_profile(latency_model=old.latency_model.model_copy(update={"attention_mha": Fit(
        features=old.latency_model.attention.features, coef=[c / 2 for c in old.latency_model.attention.coef])}))
    plan = CompressionPlan()
    p_old, p_same, p_half = (predict(tiny_bert, plan, 1, 16, p) for p in (old, same, half))
    assert p_old.breakdown["attention"] == pytest.approx(p_same.breakdown["attention"])
    assert p_half.breakdown["attention"] == pytest.approx(p_old.breakdown["attention"] / 2)
    assert p_half.ms < p_old.ms
