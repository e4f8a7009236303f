"""ONNX export: compressed models run in a plain onnxruntime session with physical low-bit kernels."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from slimformer.compression import ops  # noqa: E402
from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.memory import plan_memory  # noqa: E402
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec  # noqa: E402
from slimformer.errors import ConfigError  # noqa: E402
from slimformer.export import (  # noqa: E402
    export_fp32,
    export_onnx,
    measured_session_bytes,
    onnx_outputs,
    resident_weight_bytes,
)
from slimformer.export import kernels as K  # noqa: E402

L0, L1 = "encoder.layer.0.", "encoder.layer.1."


@pytest.fixture(scope="module")
def text_batches(bert64, texts):
    return bert64.make_batches(texts[:16], 8)


@pytest.fixture(scope="module")
def fp32_export(bert64, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    return export_fp32(bert64, path)


def _torch_out(adapter, model, batches) -> np.ndarray:
    """The deployed output the graph computes (`export_outputs[0]`: MiniLM's is L2-normalised, like encode())."""
    with torch.no_grad():
        return torch.cat([adapter.export_outputs(model, b)[0] for b in batches]).numpy()


def _assert_close(out: np.ndarray, ref: np.ndarray, atol_rel: float = 1e-5) -> np.ndarray:
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos.min()
    # the kernels are exact w.r.t. the dequantised weights: fp32 rounding only (an int8-activation kernel
    # would show errors around 1e-2 here)
    assert np.abs(out - ref).max() <= atol_rel * max(1.0, np.abs(ref).max())
    return cos


def _plain_session(model):
    """A default CPU session, as a deployment would create it."""
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


MIXED = CompressionPlan(
    units={
        "embeddings.word_embeddings": UnitSpec(bits=4, group_size=32),
        L0 + "attention.self.query": UnitSpec(bits=4, group_size=32),
        L0 + "attention.self.key": UnitSpec(bits=8),
        L0 + "attention.self.value": UnitSpec(bits=8, group_size=32),
        L0 + "attention.output.dense": UnitSpec(rank=16, bits=4, group_size=16),
        L0 + "intermediate.dense": UnitSpec(bits=4),
        L0 + "output.dense": UnitSpec(bits=16),
        L1 + "attention.self.query": UnitSpec(bits=4, group_size=24),
        L1 + "attention.self.key": UnitSpec(bits=8, group_size=48),
        L1 + "intermediate.dense": UnitSpec(bits=4, group_size=32),
        L1 + "output.dense": UnitSpec(bits=8),
    },
    layers={1: LayerSpec(heads_kept=2, neurons_kept=96)},
)


def test_mixed_plan_runs_on_low_bit_kernels(bert64, text_batches, fp32_export, tmp_path):
    model = apply_plan(bert64, MIXED)
    info = export_onnx(bert64, model, tmp_path / "model.onnx")
    assert info.path.exists() and not list(tmp_path.glob(".*tmp"))
    out = onnx_outputs(_plain_session(info.path), text_batches)
    _assert_close(out, _torch_out(bert64, model, text_batches))

    ops_used = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    assert ops_used["GatherBlockQuantized"] == info.n_gather_quantized == 1
    assert ops_used["MatMulNBits"] == info.n_matmulnbits == 7  # q, v, down, up, ffn_in (L0); k, ffn_in (L1)
    assert info.n_int8 == 4  # L0 key + L1 output (DequantizeLinear+Gemm), L0 value + L1 key (MatMulNBits 8)
    assert info.unconverted == ()
    assert info.kernels[L0 + "attention.self.key"] == "DequantizeLinear(int8,per-row)+Gemm"
    assert info.kernels[L0 + "attention.self.value"] == "MatMulNBits(bits=8,block=32)"
    assert info.kernels[L0 + "intermediate.dense"] == "MatMulNBits(bits=4,block=64)"  # per row, re-blocked
    assert info.kernels[L1 + "attention.self.query"] == "DequantizeLinear(int4,group=24)+Gemm"
    assert info.kernels[L1 + "attention.self.key"] == "MatMulNBits(bits=8,block=16)"  # group 48 = 3 x 16
    assert info.opset == 21 and info.domains["com.microsoft"] == 1

    # sizes: the stored weights are the plan's bytes (+ int64 position ids, repeated scales of group 48)
    mem = plan_memory(bert64, MIXED)
    assert abs(info.weight_bytes - mem.total_bytes) / mem.total_bytes < 0.01
    assert abs(fp32_export.weight_bytes - mem.fp32_bytes) / mem.fp32_bytes < 0.01
    ratio, planned = info.file_bytes / fp32_export.file_bytes, mem.total_bytes / mem.fp32_bytes
    assert abs(ratio - planned) / planned < 0.06  # the tiny graph's protobuf is ~5% of its 1.3 MB
    # what a session keeps: as stored, except the fp16 linear, which ORT folds to fp32 at load
    fp16_linear = 2 * 64 * 128
    assert abs(resident_weight_bytes(info.path) - (info.weight_bytes + fp16_linear)) < 1024


def test_shared_layers_are_stored_once(bert64, text_batches, tmp_path):
    units = {n: UnitSpec(bits=4, group_size=32) for n in bert64.unit_names if n.startswith(L0)}
    plan = CompressionPlan(units=units, sharing=SharingSpec(groups=((0, 1),), scope="block"))
    model = apply_plan(bert64, plan)
    info = export_onnx(bert64, model, tmp_path / "shared.onnx")
    _assert_close(onnx_outputs(info.path, text_batches), _torch_out(bert64, model, text_batches))

    proto = onnx.load(str(info.path))
    digests = [hashlib.sha256(t.raw_data or onnx.numpy_helper.to_array(t).tobytes()).hexdigest()
               for t in proto.graph.initializer]
    assert len(digests) == len(set(digests))  # every tensor content once
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 12 and len({n.input[1] for n in nbits}) == 6  # 2 layers use 6 stored matrices
    mem = plan_memory(bert64, plan)
    assert abs(info.weight_bytes - mem.total_bytes) / mem.total_bytes < 0.01


def test_identity_plan_equals_fp32_export(bert64, text_batches, fp32_export, tmp_path):
    info = export_onnx(bert64, apply_plan(bert64, CompressionPlan()), tmp_path / "identity.onnx")
    assert info.n_matmulnbits == info.n_int8 == info.n_gather_quantized == 0
    assert info.weight_bytes == fp32_export.weight_bytes
    ref = onnx_outputs(fp32_export.path, text_batches)
    np.testing.assert_allclose(onnx_outputs(info.path, text_batches), ref, atol=1e-6)
    _assert_close(ref, _torch_out(bert64, bert64.model, text_batches))
    assert not bert64.model.training  # the exporter's train-mode side effect is undone


def test_dynamic_axes_and_padding(bert64, fp32_export, texts):
    sess = _plain_session(fp32_export.path)
    for n, bs in ((1, 1), (5, 5), (12, 4)):
        batches = bert64.make_batches(texts[20:20 + n], bs)
        _assert_close(onnx_outputs(sess, batches), _torch_out(bert64, bert64.model, batches))


def test_sparse_weights_are_stored_dense(bert64, text_batches, tmp_path):
    plan = CompressionPlan(units={L0 + "intermediate.dense": UnitSpec(sparsity=0.5, pattern="2:4", bits=4,
                                                                        group_size=32)})
    model = apply_plan(bert64, plan)
    info = export_onnx(bert64, model, tmp_path / "sparse.onnx")
    _assert_close(onnx_outputs(info.path, text_batches), _torch_out(bert64, model, text_batches))
    assert info.n_matmulnbits == 1
    assert info.weight_bytes > plan_memory(bert64, plan).total_bytes  # 2:4 indices priced, codes dense here


@pytest.mark.parametrize("spec,kernels", [
    (UnitSpec(rank=16, bits=8), {"table": "Gather(int8)+Cast+Mul", "proj": "DequantizeLinear(int8,per-row)+Gemm"}),
    (UnitSpec(rank=16, bits=4, group_size=16), {"table": "GatherBlockQuantized(bits=4,block=16)",
                                                "proj": "MatMulNBits(bits=4,block=16)"}),
    (UnitSpec(bits=16), {"": "fp16 Gather + Cast"}),
])
def test_embedding_variants(bert64, text_batches, tmp_path, spec, kernels):
    name = "embeddings.word_embeddings"
    plan = CompressionPlan(units={name: spec})
    model = apply_plan(bert64, plan)
    info = export_onnx(bert64, model, tmp_path / "emb.onnx")
    _assert_close(onnx_outputs(info.path, text_batches), _torch_out(bert64, model, text_batches))
    assert info.kernels == {(f"{name}.{k}" if k else name): v for k, v in kernels.items()}
    mem = plan_memory(bert64, plan)
    assert abs(info.weight_bytes - mem.total_bytes) / mem.total_bytes < 0.01


def test_opset_17_and_groups_needing_21(bert64, tmp_path):
    ok = apply_plan(bert64, CompressionPlan(units={L0 + "attention.self.query": UnitSpec(bits=4, group_size=32),
                                                   L0 + "attention.self.key": UnitSpec(bits=8)}))
    info = export_onnx(bert64, ok, tmp_path / "o17.onnx", opset=17)
    assert info.opset == 17 and info.n_matmulnbits == 1 and info.n_int8 == 1
    _plain_session(info.path)
    odd = apply_plan(bert64, CompressionPlan(units={L0 + "attention.self.query": UnitSpec(bits=4, group_size=24)}))
    with pytest.raises(ValueError, match="opset 21"):
        export_onnx(bert64, odd, tmp_path / "odd.onnx", opset=17)
    assert not (tmp_path / "odd.onnx").exists() and not list(tmp_path.glob(".*tmp"))


def test_resident_bytes_match_session_memory(bert64, fp32_export, tmp_path):
    """The RSS one more session adds, fp32 minus compressed, is the computed difference."""
    plan = CompressionPlan(units={u: UnitSpec(bits=4, group_size=32) for u in bert64.unit_names})
    info = export_onnx(bert64, apply_plan(bert64, plan), tmp_path / "int4.onnx")
    computed = resident_weight_bytes(fp32_export.path) - resident_weight_bytes(info.path)
    measured = measured_session_bytes(fp32_export.path) - measured_session_bytes(info.path)
    assert abs(measured - computed) / computed < 0.1


def test_timm_vit_export(make_tiny, images, tmp_path):
    adapter = make_tiny("vit")
    plan = CompressionPlan(units={u.name: UnitSpec(bits=4, group_size=16) if u.role in ("qkv", "ffn_in")
                                  else UnitSpec(bits=8) for u in adapter.units})
    model = apply_plan(adapter, plan)
    info = export_onnx(adapter, model, tmp_path / "vit.onnx")
    batches = adapter.make_batches(images[0][:12], 6)
    _assert_close(onnx_outputs(info.path, batches), _torch_out(adapter, model, batches))
    assert info.n_matmulnbits == 4 and info.n_int8 == 4 and info.unconverted == ()


# -- kernels against numpy -----------------------------------------------------------------------------
def _run(low: K.Lowered, inputs: dict[str, np.ndarray], opset: int = 21) -> np.ndarray:
    in_vi = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
             for k, v in inputs.items()]
    g = onnx.helper.make_graph(low.nodes, "k", in_vi, [onnx.helper.make_tensor_value_info("y", 1, None)],
                               low.initializers)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset),
                                                 onnx.helper.make_opsetid(K.MS_DOMAIN, 1)])
    return _plain_session(m.SerializeToString()).run(None, inputs)[0]


@pytest.mark.parametrize("bits,group,k,kernel", [
    (4, 32, 80, "MatMulNBits(bits=4,block=32)"),  # K not a multiple of the block
    (4, None, 96, "MatMulNBits(bits=4,block=32)"),  # one scale per row, re-blocked
    (4, 48, 96, "MatMulNBits(bits=4,block=16)"),  # scales repeated 3x
    (4, 24, 72, "DequantizeLinear(int4,group=24)+Gemm"),
    (8, None, 64, "DequantizeLinear(int8,per-row)+Gemm"),
    (8, 32, 80, "MatMulNBits(bits=8,block=32)"),
    (8, 20, 60, "DequantizeLinear(int8,group=20)+Gemm"),
])
def test_linear_kernels_exact(bits, group, k, kernel):
    torch.manual_seed(1)
    w = torch.randn(24, k)
    q = ops.quantize(w, bits, group)
    w_hat = ops.dequantize(q).numpy().astype(np.float64)
    x = np.random.default_rng(0).standard_normal((2, 3, k)).astype(np.float32)
    bias = onnx.numpy_helper.from_array(np.linspace(-1, 1, 24, dtype=np.float32), "b")
    low, _ = K.lower_linear("x", "y", "w", q.codes.numpy(), q.scales.numpy(), bits, group, bias="b")
    low.initializers.append(bias)
    assert low.kernel == kernel
    y = _run(low, {"x": x})
    ref = x.astype(np.float64) @ w_hat.T + np.linspace(-1, 1, 24)
    assert y.shape == (2, 3, 24) and np.abs(y - ref).max() < 1e-5


@pytest.mark.parametrize("bits,group,d,kernel", [
    (4, 32, 64, "GatherBlockQuantized(bits=4,block=32)"),
    (4, None, 96, "GatherBlockQuantized(bits=4,block=32)"),
    (8, 16, 48, "GatherBlockQuantized(bits=8,block=16)"),
    (8, None, 40, "Gather(int8)+Cast+Mul"),
    (4, 20, 40, "Gather(int8)+Cast+Mul"),
])
def test_embedding_kernels_exact(bits, group, d, kernel):
    torch.manual_seed(2)
    q = ops.quantize(torch.randn(50, d), bits, group)
    table = ops.dequantize(q).numpy()
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    low = K.lower_embedding("ids", "y", "t", q.codes.numpy(), q.scales.numpy(), bits, group)
    assert low.kernel == kernel
    np.testing.assert_array_equal(_run(low, {"ids": ids}), table[ids])


def test_real_minilm_mixed_plan(minilm, tmp_path):
    from slimformer.data import text_splits

    units = {u.name: UnitSpec(bits=4, group_size=32) if u.role in ("ffn_in", "ffn_out")
             else UnitSpec(bits=8) for u in minilm.units}
    plan = CompressionPlan(units=units)
    model = apply_plan(minilm, plan)
    batches = minilm.make_batches(text_splits(0, 256)[1][:64], 32)
    info = export_onnx(minilm, model, tmp_path / "minilm.onnx")
    cos = _assert_close(onnx_outputs(info.path, batches), _torch_out(minilm, model, batches))
    assert cos.mean() >= 0.999
    total = plan_memory(minilm, plan).total_bytes
    # the file adds the graph (node/tensor names, attributes: ~0.9%) and int64 position ids (4 KB)
    assert abs(info.file_bytes - total) / total < 0.02
    assert abs(resident_weight_bytes(info.path) - total) / total < 0.02
    assert info.n_matmulnbits == 12 and info.n_int8 == 24 and info.n_gather_quantized == 1


def test_fast_kernels_keep_codes_in_file_and_run_int8_gemms(bert64, text_batches, tmp_path):
    """kernels='fast': every int4/int8 linear runs as DynamicQuantizeMatMul; the file keeps the stored
    codes (plan bytes), the session widens them to int8; outputs within the documented tolerance."""
    model = apply_plan(bert64, MIXED)
    info = export_onnx(bert64, model, tmp_path / "fast.onnx", kernels="fast", calibration=text_batches)
    ops_used = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    assert info.kernel_mode == "fast" and info.n_dynamic_int8 == 10
    # q/k/v reading one (smoothed) input run as one kernel: fewer nodes than matrices
    assert info.n_dynamic_int8_nodes == ops_used["DynamicQuantizeMatMul"] < 10
    assert ops_used["MatMulNBits"] == 0 and ops_used["GatherBlockQuantized"] == 1  # tables are not affected
    assert info.kernels[L1 + "attention.self.query"].startswith("DynamicQuantizeMatMul(int4 stored")
    mem = plan_memory(bert64, MIXED)
    assert abs(info.weight_bytes - mem.total_bytes) / mem.total_bytes < 0.05  # + smoothing vectors, padding
    assert resident_weight_bytes(info.path) > info.weight_bytes + 64 * 128 // 2  # int4 codes resident as int8
    out = onnx_outputs(_plain_session(info.path), text_batches)
    ref = _torch_out(bert64, model, text_batches)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.mean() >= 0.99 and np.abs(out - ref).max() > 1e-5  # close, but activations are quantised


def test_fast_kernels_smooth_a_shared_input_once(bert64, text_batches, tmp_path):
    """query/key/value read one tensor: one set of SmoothQuant factors, one x / smooth node for the three, and
    one fused DynamicQuantizeMatMul for the three; attention output, FFN in and FFN out each smooth their own
    input (4 smoothing nodes per layer, 4 int8 GEMMs per layer for 6 matrices)."""
    units = {n: UnitSpec(bits=4, group_size=32) for n in bert64.unit_names if n != "embeddings.word_embeddings"}
    plan = CompressionPlan(units=units)
    model = apply_plan(bert64, plan)
    info = export_onnx(bert64, model, tmp_path / "qkv.onnx", kernels="fast", calibration=text_batches)
    nodes = onnx.load(str(info.path)).graph.node
    smoothing = [n for n in nodes if n.name.endswith("/SmoothInput")]
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in nodes) == 2 * 4 and len(smoothing) == 2 * 4
    assert info.n_dynamic_int8 == 12
    readers = Counter(i for n in nodes if n.op_type == "DynamicQuantizeMatMul" for i in n.input[:1])
    assert sorted(readers[n.output[0]] for n in smoothing) == [1] * 8
    out = onnx_outputs(_plain_session(info.path), text_batches)
    ref = _torch_out(bert64, model, text_batches)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.mean() >= 0.99


def test_kernel_choice_modes_and_bad_mode(bert64, tmp_path):
    assert K.choose_linear_kernel(4, 32, 384, 384, mode="fast").kind == "dynamic_int8"
    assert K.choose_linear_kernel(8, None, 384, 384, mode="fast").kind == "dynamic_int8"
    assert K.choose_linear_kernel(16, None, 384, 384, mode="fast").kind == "fp16_matmul"  # not integer: unchanged
    assert K.choose_linear_kernel(4, 32, 384, 384).kind == "matmulnbits"
    with pytest.raises(ConfigError, match="kernels must be one of exact, fast"):
        export_onnx(bert64, bert64.model, tmp_path / "x.onnx", kernels="turbo")  # type: ignore[arg-type]


def test_fast_kernels_build_a_shared_weight_once(bert64, text_batches, tmp_path):
    units = {n: UnitSpec(bits=4, group_size=32) for n in bert64.unit_names if n.startswith(L0)}
    plan = CompressionPlan(units=units, sharing=SharingSpec(groups=((0, 1),), scope="block"))
    info = export_onnx(bert64, apply_plan(bert64, plan), tmp_path / "shared-fast.onnx", kernels="fast")
    nodes = onnx.load(str(info.path)).graph.node
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in nodes) == 12
    assert sum(n.name.endswith("/Widen") for n in nodes) == 6  # one widened int8 weight per stored matrix
    assert onnx_outputs(_plain_session(info.path), text_batches).shape == (16, 64)


def _optimised_ops(path) -> Counter:
    """Op counts of the graph a default CPU session actually runs (its optimised model)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_attention_lowering_and_pruned_heads_stay_per_layer(bert64, fp32_export, texts, tmp_path):
    """The fp32 baseline (a plain `torch.onnx.export`, SDPA pattern) is not fused by ORT 1.32, neither in a
    default session nor by onnxruntime.transformers.optimizer: attention stays MatMul + Softmax + MatMul.
    `export_onnx` lowers each layer's attention core to one com.microsoft.MultiHeadAttention with that
    layer's own head count (pruned heads: smaller q/k/v matrices and a smaller num_heads), no Softmax, IsNaN
    or Where left, and ORT keeps its LayerNorm fusions."""
    from onnxruntime.transformers.optimizer import optimize_model

    pruned_plan = CompressionPlan(layers={1: LayerSpec(heads_kept=2)})
    pruned = apply_plan(bert64, pruned_plan)
    info = export_onnx(bert64, pruned, tmp_path / "pruned.onnx")
    base = _optimised_ops(fp32_export.path)
    assert base["Attention"] == base["MultiHeadAttention"] == 0
    assert base["Softmax"] == 2 and base["SkipLayerNormalization"] == 2  # one per layer: unfused
    fused = optimize_model(str(fp32_export.path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    assert not any(n.op_type in ("Attention", "MultiHeadAttention") for n in fused.model.graph.node)
    ops_used = _optimised_ops(info.path)
    assert ops_used["MultiHeadAttention"] == 2 and ops_used["SkipLayerNormalization"] == 2
    assert ops_used["Softmax"] == ops_used["IsNaN"] == 0
    mha = [n for n in onnx.load(str(info.path)).graph.node if n.op_type == "MultiHeadAttention"]
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in mha]
    assert heads == [bert64.model.config.num_attention_heads, 2]
    widths = {t.name: tuple(t.dims) for t in onnx.load(str(info.path)).graph.initializer if len(t.dims) == 2}
    q_widths = sorted(w[1] for n, w in widths.items() if w[0] == 64 and w[1] in (32, 64))
    assert q_widths.count(32) >= 3  # layer 1: q, k, v of 2 heads x 16
    for n, bs in ((1, 1), (5, 5)):  # per-layer head counts right at every batch / sequence length
        batches = bert64.make_batches(texts[30:30 + n], bs)
        _assert_close(onnx_outputs(info.path, batches), _torch_out(bert64, pruned, batches))
