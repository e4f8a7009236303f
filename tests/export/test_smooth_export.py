"""Smoothed int8-kernel units (UnitSpec.smooth) in the ONNX export: the graph smooths with the unit's own factors
(one x / s node for query/key/value, which still run as one fused kernel), torch and onnxruntime compute the same
thing, the file stays within the priced bytes, and the CLI takes the field (a bad value exits 2 with one line)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from helpers import invoke

ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from slimformer.compression import ops  # noqa: E402
from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.calibration import collect_input_abs_max  # noqa: E402
from slimformer.compression.plan import CompressionPlan, UnitSpec  # noqa: E402
from slimformer.export import export_onnx, onnx_outputs  # noqa: E402
from slimformer.export import kernels as K  # noqa: E402

L0, L1 = "encoder.layer.0.", "encoder.layer.1."
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


def _session(low: K.Lowered, k: int, extra: list[onnx.TensorProto]) -> ort.InferenceSession:
    graph = helper.make_graph(low.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], low.initializers + extra)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(K.MS_DOMAIN, 1)])
    proto.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_smoothed_torch_int8_linear_equals_onnxruntime() -> None:
    """One smoothed unit: ops.int8_linear(x, W, b, s) and the exporter's dynamic_int8(..., smooth=s) on ORT agree
    to ~1e-5 relative, on inputs with an outlier channel; the graph holds the smoothing Mul. The weight codes stay
    within +-ops.int8_weight_qmax() (64 on x86 without VNNI, where ORT's kernel adds adjacent u8 x s8 products in
    saturating int16: with +-127 codes this very input differed by up to 4.8 on outputs of ~190 on such a CPU)."""
    rng = np.random.default_rng(1)
    for bits, group, (n, k) in ((8, None, (48, 96)), (4, 32, (40, 96))):
        lim = (1 << (bits - 1)) - 1
        codes = rng.integers(-lim, lim + 1, size=(n, k)).astype(np.int8)
        scales = (rng.random((n, 1 if group is None else k // group)) * 0.01 + 1e-3).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        x = (rng.standard_normal((2, 7, k)) * 2).astype(np.float32)
        x[..., 5] *= 40.0  # the outlier channel
        w = torch.from_numpy(K.dequantized(codes, scales, group))
        s = ops.smoothing_factors(torch.from_numpy(np.abs(x).reshape(-1, k).max(0)), w, 0.8)
        low = K.dynamic_int8("x", "y", "p", codes, scales, bits, group, "b", smooth=s.numpy())
        assert [nd.name for nd in low.nodes if nd.op_type == "Mul"][-2:] == ["p/SmoothWeight", "p/SmoothInput"]
        y = _session(low, k, [K.f32("b", bias)]).run(None, {"x": x})[0]
        t = ops.int8_linear(torch.from_numpy(x), w, torch.from_numpy(bias), s).numpy()
        np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-5 * np.abs(y).max())
        plain = ops.int8_linear(torch.from_numpy(x), w, torch.from_numpy(bias)).numpy()
        exact = (x @ w.numpy().T) + bias
        assert np.abs(t - exact).mean() < np.abs(plain - exact).mean()  # the outlier costs less smoothed


def _plan(alpha: float | None = 0.8) -> CompressionPlan:
    units = {p + u: UnitSpec(bits=8 if u.endswith("key") else 4, group_size=32, kernel="int8", smooth=alpha)
             for p in (L0, L1) for u in QKV}
    units[L0 + "intermediate.dense"] = UnitSpec(bits=4, group_size=32, kernel="int8", smooth=alpha)
    units[L0 + "output.dense"] = UnitSpec(rank=16, bits=8, kernel="int8", smooth=alpha)
    units[L1 + "intermediate.dense"] = UnitSpec(bits=4, group_size=32)  # exact kernel
    return CompressionPlan(units=units)


def test_smoothed_model_torch_and_onnx_agree(bert64, texts, tmp_path: Path) -> None:
    """A tiny model with smoothed q/k/v (one SmoothInput and one fused DynamicQuantizeMatMul per layer), a smoothed
    FFN-in, a low-rank FFN-out (`down` smoothed, `up` with unit factors) and an exact unit: the ONNX outputs equal
    torch's to ~1e-5 relative (measured 4e-7 of outputs up to 2.1), and they differ from the unsmoothed plan's
    (smoothing is in the graph)."""
    cal, test = bert64.make_batches(texts[:32], 8), bert64.make_batches(texts[32:48], 8)
    model = apply_plan(bert64, _plan(), act_max=collect_input_abs_max(bert64, cal))
    info = export_onnx(bert64, model, tmp_path / "s.onnx")
    nodes = onnx.load(str(info.path)).graph.node
    used = Counter(n.op_type for n in nodes)
    smooth_in = [n for n in nodes if n.name.endswith("/SmoothInput")]
    assert len(smooth_in) == 2 + 1 + 2  # q/k/v of each layer once, FFN-in, the low-rank down and up
    assert used["DynamicQuantizeMatMul"] == 2 + 1 + 2  # fused q/k/v per layer, FFN-in, down + up
    assert info.kernels[L0 + "attention.self.query"].endswith("fused x3")
    assert "smoothed" in info.kernels[L0 + "intermediate.dense"]
    assert "DynamicQuantizeMatMul" not in info.kernels[L1 + "intermediate.dense"]
    with torch.no_grad():
        ref = torch.cat([bert64.output(model, b) for b in test]).numpy()
    out = onnx_outputs(info.path, test, threads=1)
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), np.abs(out - ref).max()
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999
    plain = export_onnx(bert64, apply_plan(bert64, _plan(None)), tmp_path / "p.onnx")
    assert not any(n.name.endswith("/SmoothInput") for n in onnx.load(str(plain.path)).graph.node)
    assert np.abs(onnx_outputs(plain.path, test, threads=1) - ref).max() > 10 * np.abs(out - ref).max()


def test_fast_override_keeps_a_units_own_factors(bert64, texts, tmp_path: Path) -> None:
    """--kernels fast smooths every other int4/int8 linear from export-time statistics; a smoothed unit keeps its
    own factors (what torch computes), and mixed q/k/v (own vs export factors) do not fuse."""
    cal = bert64.make_batches(texts[:16], 8)
    plan = _plan().with_units(**{L1 + "attention.self.key": UnitSpec(bits=8, group_size=32)})
    model = apply_plan(bert64, plan, act_max=collect_input_abs_max(bert64, cal))
    info = export_onnx(bert64, model, tmp_path / "f.onnx", kernels="fast", calibration=cal)
    assert info.n_dynamic_int8 == 10  # every int4/int8 linear matrix (the low-rank unit is two)
    assert info.kernels[L0 + "attention.self.query"].endswith("fused x3")
    assert "fused" not in info.kernels[L1 + "attention.self.query"]
    g = onnx.load(str(info.path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    mul = next(n for n in g.node if n.name == L0 + "intermediate.dense/SmoothWeight")
    own = model.get_submodule(L0 + "intermediate.dense").smooth.numpy()
    np.testing.assert_array_equal(inits[mul.input[1]].reshape(-1), own)
    assert np.isfinite(onnx_outputs(info.path, cal[:1], threads=1)).all()


def _recipe(tmp_path: Path, model: Path, spec: dict) -> Path:
    rules = [{"match": "re:.*attention.self.(query|key|value)", "spec": spec},
             {"match": "re:.*intermediate.dense", "spec": {"bits": 4, "group_size": 16, "kernel": "int8"}}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"slimformer_recipe": 1, "model": {"id": str(model)}, "rules": rules}))
    return path


def test_cli_apply_smoothed_recipe_writes_the_smoothing(tmp_path: Path, tiny_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_dir, {"bits": 8, "kernel": "int8", "smooth": 0.65})
    out = tmp_path / "out"
    res = invoke("apply", recipe, "--model", tiny_dir, "--out", out, "--onnx", "--samples", 16)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if "model.onnx" in x)
    assert float(line.split("mean cosine ")[1].split(",")[0]) > 0.9999  # ONNX vs torch
    assert "smooth: 0.65" in (out / "slimformer.yaml").read_text()
    names = [n.name for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node]
    assert sum(n.endswith("/SmoothInput") for n in names) == 2  # q/k/v of each layer; FFN-in unsmoothed


@pytest.mark.parametrize(("smooth", "needle"), [(1.5, "smooth"), (0.5, "applies to kernel int8 units only")])
def test_cli_bad_smooth_exits_2_with_one_line(tmp_path: Path, tiny_dir: Path, smooth: float, needle: str) -> None:
    spec = {"bits": 8, "kernel": "int8", "smooth": smooth} if smooth > 1 else {"bits": 8, "smooth": smooth}
    recipe = _recipe(tmp_path, tiny_dir, spec)
    res = invoke("apply", recipe, "--model", tiny_dir, "--out", tmp_path / "out", "--samples", 8)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
