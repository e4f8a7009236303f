"""Calibration on tiny shapes: the micro-benchmarks run the exporter's kernels and the fitted profile
predicts; the CLI writes a loadable v2 profile; validation metrics behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slimformer.cli import main
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.export.kernels import KernelChoice
from slimformer.hardware_profiles import load_profile
from slimformer.hardware_profiles import microbench as mb
from slimformer.hardware_profiles.calibrate import CalibrationGrid, calibrate, fit_nnls
from slimformer.hardware_profiles.predict import predict
from slimformer.hardware_profiles.validate import metrics, random_plan

TINY = CalibrationGrid(
    m_values=(1, 4), dims=(16, 32),
    linear=(KernelChoice("matmul", 32), KernelChoice("matmulnbits", 4, 16, 16)),
    embedding=(KernelChoice("gather", 32),), heads=(1, 2), seqs=(8,), head_dims=(8,), elem_rows=(1, 4),
    elem_widths=(16,), references=(), seconds=10.0)


def test_tiny_calibration_fits_every_class_and_predicts(tiny_bert) -> None:
    prof = calibrate(1, TINY, name="tiny", progress=False)
    lm = prof.latency_model
    assert lm is not None and prof.calibrated and prof.runtime == "onnxruntime"
    assert set(lm.linear) == {"matmul", "matmulnbits:4:16"}
    assert all(len(t.fits) == 2 and all(min(f.coef) >= 0 for f in t.fits) for t in lm.linear.values())
    assert lm.attention is not None and set(lm.elementwise) == {"add", "layernorm", "gelu"}
    assert lm.attention_mha is not None and min(lm.attention_mha.coef) >= 0  # the fused core the exporter writes
    assert prof.noise is not None and prof.calibration is not None and prof.calibration.clock == "thread_cpu"
    assert prof.peak_gflops_fp32 > 0 and prof.mem_bandwidth_gbs > 0
    p = predict(tiny_bert, CompressionPlan(units={u.name: UnitSpec(bits=4, group_size=16) for u in tiny_bert.units}),
                1, 4, prof)
    assert p.ms > 0 and "matmulnbits:4:16" in p.breakdown


def test_linear_graph_uses_the_exporters_kernel() -> None:
    proto, feed = mb.linear_graph(KernelChoice("dequant_gemm", 8), 2, 16, 8, copies=2)
    ops = {n.op_type for n in proto.graph.node}
    assert {"DequantizeLinear", "Gemm"} <= ops
    t = mb.time_graph(proto, feed, 2, 1, runs=3)
    assert len(t.kernel_us) == 3 and t.median_us >= 0


def test_fit_nnls_is_non_negative_and_exact_on_linear_data() -> None:
    x = np.array([[1.0, k] for k in (1, 2, 4, 8, 16)])
    t = 3.0 + 0.5 * x[:, 1]
    f = fit_nnls(x, t, ["1", "k"])
    assert np.allclose(f.coef, [3.0, 0.5], rtol=1e-6) and f.rmse_rel < 1e-9
    f = fit_nnls(x, 10.0 - 0.1 * x[:, 1], ["1", "k"])  # decreasing data cannot make a coefficient negative
    assert min(f.coef) >= 0


def test_cli_quick_with_restricted_shapes(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    r = CliRunner().invoke(main, ["calibrate", "--quick", "--threads", "1", "--m", "1", "--dims", "16",
                                  "--references", "none", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    prof = load_profile(out)
    assert prof.calibrated and prof.calibration is not None and prof.calibration.seconds < 120
    assert all(t.m_values == [1] for t in prof.latency_model.linear.values())  # type: ignore[union-attr]
    r = CliRunner().invoke(main, ["profile", "show", str(out)])
    assert r.exit_code == 0 and prof.name in r.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["profile", "validate", str(tmp_path / "none.yaml"), "--model", "x"])
    assert r.exit_code == 2 and "error:" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(main, ["profile", "validate", "amd-epyc-avx512-2t-torch", "--model", "vit-fmnist"])
    assert r.exit_code == 2 and "no calibrated latency model" in r.output


def test_validation_metrics_and_random_plans(tiny_bert) -> None:
    m = metrics(np.array([10.0, 20.0, 30.0, 40.0]), np.array([10.4, 21.5, 29.0, 48.0]))
    assert m["within_5"] == pytest.approx(0.5) and m["within_10"] == pytest.approx(0.75)
    assert m["mape"] == pytest.approx((0.04 + 0.075 + 1 / 30 + 0.2) / 4)
    assert m["kendall_tau"] == pytest.approx(1.0)
    import random

    rng = random.Random(0)
    plans = [random_plan(tiny_bert, rng)[0] for _ in range(20)]
    assert len({repr(p) for p in plans}) == 20
    assert any(p.layers for p in plans) and any(s.rank for p in plans for s in p.units.values())
    assert {s.bits for p in plans for s in p.units.values()} == {32, 16, 8, 4}


def test_runs_per_pass_follow_kernel_speed_and_the_plans_fit_their_budgets() -> None:
    from slimformer.hardware_profiles.sampling import RepeatPolicy

    p = RepeatPolicy()
    assert p.runs(3.0, p.pass_s) == p.max_runs  # a 3 µs kernel: the cap
    assert p.runs(200_000.0, p.pass_s) == p.min_runs  # a very slow one: the floor
    assert p.min_runs < p.runs(1000.0, p.pass_s) < p.max_runs
    full, quick = CalibrationGrid.full(), CalibrationGrid.quick()
    assert full.seconds <= 600 and quick.seconds <= 180  # the explicit budgets: 10 and 3 minutes
    assert full.plan_seconds() <= 1.05 * full.micro_share * full.seconds
    assert quick.plan_seconds() <= quick.micro_share * quick.seconds
    assert quick.cells() < full.cells() / 3 and quick.quick_mode and not full.quick_mode


def test_reference_and_validation_rounds_follow_model_speed() -> None:
    from slimformer.hardware_profiles.residual_fit import reference_runs
    from slimformer.hardware_profiles.validate import MAX_ROUNDS, pass_rounds

    assert reference_runs(0.3, 7) == 200 and reference_runs(35.0, 7) == 15 and reference_runs(0.3, 15, repeat=17) < 200
    from slimformer.hardware_profiles.model_timing import MAX_REPEAT, WARM_MS, WARM_REPEAT, warm_repeat

    assert warm_repeat(35.0) == WARM_REPEAT, "a MiniLM run is long enough"
    assert warm_repeat(0.4) * 0.4 >= WARM_MS > (warm_repeat(0.4) - 1) * 0.4, "a ViT turn lasts >= WARM_MS"
    assert warm_repeat(1e-6) == MAX_REPEAT and warm_repeat(0.2) > warm_repeat(0.4) >= warm_repeat(2.0)
    assert pass_rounds(25, 64 * 0.35, repeat=12) < pass_rounds(25, 64 * 0.35), "longer turns, fewer rounds"
    assert pass_rounds(25, 64 * 35.0) == 25  # MiniLM: 25 rounds already take minutes
    vit = pass_rounds(25, 64 * 0.35)  # the ViT: enough rounds for a 20 s pass
    assert vit > 200 and vit * 4 * 64 * 0.35 >= 20e3
    assert pass_rounds(25, 0.01) == MAX_ROUNDS


def test_every_cell_gets_its_passes_and_the_profile_says_how_it_was_sampled() -> None:
    from dataclasses import replace

    from slimformer.hardware_profiles.sampling import RepeatPolicy

    prof = calibrate(1, replace(TINY, policy=RepeatPolicy(min_passes=2, max_passes=3)), name="tiny", progress=False)
    cal, noise = prof.calibration, prof.noise
    assert cal is not None and noise is not None
    assert TINY.cells() == noise.repeats and cal.measurements >= 2 * TINY.cells()
    assert cal.budget_seconds == TINY.seconds and cal.planned_seconds is not None and cal.micro_seconds is not None
    assert noise.median_pass_rel_sd is not None and noise.remeasured_passes is not None
    lm = prof.latency_model
    assert lm is not None and prof.per_op_overhead_us >= 0.05 and lm.call_overhead_us > prof.per_op_overhead_us


def test_fused_attention_bench_computes_the_decomposed_core() -> None:
    """The MultiHeadAttention micro-benchmark graph computes what the decomposed one does (same feed, zero
    mask), so the two fits price the same work."""
    import numpy as np
    import onnxruntime as ort

    from slimformer.hardware_profiles import microbench as mb

    outs = []
    for make in (mb.attention_graph, mb.mha_graph):
        model, feed = make(4, 24, 16, 2)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        outs.append(sess.run(None, {k: v for k, v in feed.items() if k in names}))
    assert [o.shape for o in outs[1]] == [(1, 24, 64)] * 2
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_elementwise_fit_keeps_one_node_dispatch_when_elements_dominate() -> None:
    """Cells whose time is all per-element cost (intercept 0, as overhead subtraction can leave them) used to fit
    0 µs per node, which physical_problems refuses, so a quiet calibration failed; the floored fit keeps a node at
    >= MIN_NODE_US and still fits the per-element slope."""
    import numpy as np

    from slimformer.hardware_profiles.calibrate import fit_nnls
    from slimformer.hardware_profiles.profile import MIN_NODE_US

    n = np.array([256.0, 1024, 4096, 16384, 65536])
    x = np.stack([np.ones_like(n), n], axis=1)
    t = 0.002 * n
    free = fit_nnls(x, t, ["1", "elements"])
    floored = fit_nnls(x, t, ["1", "elements"], floor=MIN_NODE_US)
    assert free.coef[0] + free.coef[1] < MIN_NODE_US  # what made the profile unphysical
    assert floored.coef[0] >= MIN_NODE_US
    assert floored.coef[1] == pytest.approx(0.002, rel=0.05)
    assert floored.rmse_rel < 0.2
