"""Per-unit kernels in the ONNX export: int8-kernel units run DynamicQuantizeMatMul, the torch model computes
the same numerics (so the search scores what the export runs), and `kernels=` overrides every unit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from slimformer.compression import ops  # noqa: E402
from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.modules import exact_compute  # noqa: E402
from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec  # noqa: E402
from slimformer.export import export_onnx, onnx_outputs  # noqa: E402
from slimformer.export import kernels as K  # noqa: E402

L0, L1 = "encoder.layer.0.", "encoder.layer.1."


# 6 int8-kernel matrices: 5 units, the low-rank one is two DynamicQuantizeMatMuls; layer 0's query and key read
# one input and run as one fused DynamicQuantizeMatMul (export.graph: `fused_group`), so 5 kernels in the graph
MIXED = CompressionPlan(
    units={
        "embeddings.word_embeddings": UnitSpec(bits=4, group_size=32),
        L0 + "attention.self.query": UnitSpec(bits=4, group_size=32, kernel="int8"),
        L0 + "attention.self.key": UnitSpec(bits=8, kernel="int8"),
        L0 + "attention.self.value": UnitSpec(bits=8, group_size=32),
        L0 + "attention.output.dense": UnitSpec(rank=16, bits=4, group_size=16, kernel="int8"),
        L0 + "intermediate.dense": UnitSpec(bits=4),
        L1 + "attention.self.query": UnitSpec(bits=4, group_size=24, kernel="int8"),
        L1 + "intermediate.dense": UnitSpec(bits=4, group_size=32),
        L1 + "output.dense": UnitSpec(bits=8, kernel="int8"),
    },
    layers={1: LayerSpec(heads_kept=2, neurons_kept=96)},
)
N_INT8 = 6
N_INT8_NODES = 5


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _torch_out(adapter, model, batches) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([adapter.output(model, b) for b in batches]).numpy()


def test_int8_units_reach_the_graph_and_torch_computes_the_same(bert64, texts, tmp_path) -> None:
    """One DynamicQuantizeMatMul per int8-kernel matrix (query and key of layer 0 share one: same input), none
    smoothed; the other units keep their exact kernels.
    Torch and ONNX agree to float rounding plus its rare flips of an activation code (measured on this model:
    per-text cosine >= 0.9999998, max |diff| 9e-6 of outputs up to 2.2; the exact override is 4.8e-4 away)."""
    batches = bert64.make_batches(texts[:32], 8)
    model = apply_plan(bert64, MIXED)
    info = export_onnx(bert64, model, tmp_path / "unit.onnx")
    nodes = onnx.load(str(info.path)).graph.node
    used = Counter(n.op_type for n in nodes)
    assert info.kernel_mode == K.PER_UNIT and info.n_dynamic_int8 == N_INT8
    assert info.n_dynamic_int8_nodes == used["DynamicQuantizeMatMul"] == N_INT8_NODES
    assert info.kernels[L0 + "attention.self.query"].endswith("fused x2")
    assert not any(n.name.endswith("/SmoothInput") for n in nodes)  # torch does not smooth: neither does ONNX
    assert info.kernels[L0 + "attention.self.value"] == "MatMulNBits(bits=8,block=32)"
    assert info.kernels[L0 + "attention.self.key"].startswith("DynamicQuantizeMatMul(int8 stored")
    assert used["GatherBlockQuantized"] == 1
    out, ref = onnx_outputs(info.path, batches, threads=1), _torch_out(bert64, model, batches)
    cos = _cos(out, ref)
    assert cos.min() >= 0.99999 and np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    exact = export_onnx(bert64, model, tmp_path / "exact.onnx", kernels="exact")
    assert exact.n_dynamic_int8 == 0 and exact.kernel_mode == "exact"
    gap = np.abs(onnx_outputs(exact.path, batches, threads=1) - ref).max()
    assert gap > 10 * np.abs(out - ref).max()  # the override computes something else than torch's int8 units


def test_fast_override_lowers_every_quantised_unit(bert64, texts, tmp_path) -> None:
    model = apply_plan(bert64, MIXED)
    info = export_onnx(bert64, model, tmp_path / "fast.onnx", kernels="fast",
                       calibration=bert64.make_batches(texts[:8], 8))
    assert info.kernel_mode == "fast" and info.n_dynamic_int8 == 9  # every int4/int8 linear matrix
    assert any(n.name.endswith("/SmoothInput") for n in onnx.load(str(info.path)).graph.node)


def test_torch_int8_linear_equals_onnxruntime_dynamic_quantize_matmul() -> None:
    """The kernel itself: ops.int8_linear and ORT's DynamicQuantizeMatMul (built by the exporter) agree to fp32
    rounding of the final rescale (measured: bit-equal on this CPU). The last case has an input channel 20x the
    others: on x86 without VNNI that saturates ORT's int16 pair sums unless the weights are within ±64
    (ops.int8_weight_qmax), and then it agrees too."""
    rng = np.random.default_rng(0)
    for bits, group, (n, k), outlier in ((8, None, (48, 96), 1), (4, 32, (40, 96), 1), (4, None, (24, 80), 1),
                                         (8, None, (64, 384), 20)):
        lim = (1 << (bits - 1)) - 1
        codes = rng.integers(-lim, lim + 1, size=(n, k)).astype(np.int8)
        ng = 1 if group is None else k // group
        scales = (rng.random((n, ng)) * 0.01 + 1e-3).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        low = K.dynamic_int8("x", "y", "p", codes, scales, bits, group, "b")
        graph = helper.make_graph(low.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  low.initializers + [K.f32("b", bias)])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid(K.MS_DOMAIN, 1)])
        proto.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = (rng.standard_normal((2, 7, k)) * 2).astype(np.float32)
        x[..., 5] *= outlier
        y = sess.run(None, {"x": x})[0]
        w = torch.from_numpy(K.dequantized(codes, scales, group))
        t = ops.int8_linear(torch.from_numpy(x), w, torch.from_numpy(bias)).numpy()
        np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-5 * np.abs(y).max())


@pytest.mark.slow
def test_minilm_int8_kernel_scores_agree_between_torch_and_onnx(minilm, tmp_path) -> None:
    """The goal of scoring in torch: cosine to the teacher of the torch int8-kernel model and of its ONNX export
    differ by < 0.003 on packaged fortunes texts (measured: < 1e-4 for int8 and int4-g32 plans)."""
    from slimformer.data import text_splits

    held = text_splits(64, 64)[1]
    batches = minilm.make_batches(held, 32)
    lin = [u.name for u in minilm.units if u.kind == "linear"]
    plan = CompressionPlan(units={n: UnitSpec(bits=4, group_size=32, kernel="int8") for n in lin})
    model = apply_plan(minilm, plan)
    info = export_onnx(minilm, model, tmp_path / "minilm-int8.onnx")
    assert info.n_dynamic_int8 == len(lin)
    teacher = _torch_out(minilm, minilm.model, batches)
    torch_score = float(_cos(_torch_out(minilm, model, batches), teacher).mean())
    onnx_score = float(_cos(onnx_outputs(info.path, batches, threads=1), teacher).mean())
    assert abs(torch_score - onnx_score) < 0.003, (torch_score, onnx_score)
    with exact_compute(model):
        exact_score = float(_cos(_torch_out(minilm, model, batches), teacher).mean())
    assert torch_score < exact_score - 0.002  # the search sees what quantised activations cost (~0.948 vs ~0.957)


@pytest.mark.parametrize("kernels", [None, "fast"])
def test_qkv_on_the_int8_gemm_run_as_one_kernel_with_identical_outputs_and_bytes(bert64, texts, tmp_path,
                                                                                   kernels) -> None:
    """query/key/value on the int8 GEMM (per-unit int8 kernels, or the fast override) run as one
    DynamicQuantizeMatMul per layer: outputs identical to three kernels (the activation's per-tensor scale
    depends on the input only), the stored codes and scales byte for byte the same, the session's weights
    within a few bytes (the split sizes); test_deploy_memory's "kernel int8" plan checks the file stays within
    what plan_memory prices."""
    from slimformer.export import resident_weight_bytes

    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    plan = CompressionPlan(units={p + u: UnitSpec(bits=8 if u.endswith("key") else 4, group_size=32, kernel="int8")
                                  for p in (L0, L1) for u in qkv})
    model = apply_plan(bert64, plan)
    batches = bert64.make_batches(texts[:16], 8)
    cal = batches if kernels == "fast" else None
    one = export_onnx(bert64, model, tmp_path / "one.onnx", kernels=kernels, calibration=cal)
    three = export_onnx(bert64, model, tmp_path / "three.onnx", kernels=kernels, calibration=cal,
                        fuse_projections=False)
    assert (one.n_dynamic_int8_nodes, three.n_dynamic_int8_nodes) == (2, 6)
    assert one.n_dynamic_int8 == three.n_dynamic_int8 == 6
    np.testing.assert_array_equal(onnx_outputs(one.path, batches, threads=1),
                                  onnx_outputs(three.path, batches, threads=1))
    assert {k: v for k, v in one.initializer_bytes.items() if k != "int64"} == \
        {k: v for k, v in three.initializer_bytes.items() if k != "int64"}
    assert 0 <= resident_weight_bytes(one.path) - resident_weight_bytes(three.path) <= 2 * 3 * 8
