"""Attention lowered to com.microsoft.MultiHeadAttention (export/attention.py): it reaches the graph, the
NaN guard and layout Transposes are gone, and the outputs equal torch's, padded batches included."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from slimformer.compression.apply import apply_plan
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.export import export_fp32, export_onnx, onnx_outputs
from slimformer.export.attention import cancel_layout_pairs, count_fused, fused_attention
from slimformer.models.base import Batch
from tests.conftest import ALL_FAMILIES, TINY_LAYERS


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@torch.no_grad()
def _torch_outputs(adapter, model, batches) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy() for t in adapter.export_outputs(model, b)) for b in batches]


def _onnx_all(path, batches) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {k: b.inputs[k].numpy() for k in names}) for b in batches]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_lowers_each_layer_to_one_fused_node(make_tiny, batches, family, tmp_path):
    """One MultiHeadAttention per layer, no Softmax / IsNaN (the SDPA export's NaN guard) and fewer
    Transposes; every output (pooled and per token) equals torch's to float rounding on batches of texts of
    different lengths (padding) or images. MPNet computes its attention itself (relative position bias, no
    SDPA call): its attention stays torch's."""
    adapter = make_tiny(family)
    info = export_onnx(adapter, adapter.model, tmp_path / "m.onnx")
    ops = _ops(info.path)
    plain = _ops(export_fp32(adapter, tmp_path / "plain.onnx").path)
    assert plain["MultiHeadAttention"] == 0 and plain["Softmax"] == TINY_LAYERS[family]
    if family == "mpnet":
        assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == plain["Softmax"]
    else:
        assert ops["MultiHeadAttention"] == TINY_LAYERS[family]
        assert ops["Softmax"] == ops["IsNaN"] == 0
        assert ops["Transpose"] < plain["Transpose"]
    bs = batches(adapter, n=12, batch_size=6)
    for want, got in zip(_torch_outputs(adapter, adapter.model, bs), _onnx_all(info.path, bs), strict=True):
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)


def test_hf_encoders_have_no_transpose_and_one_mask_bias(make_tiny, tmp_path):
    """HF encoders: the head split/merge Transposes cancel against the fused node's layout exactly (none left
    in the whole graph), and all layers share one bias made from the padding mask (one Where)."""
    adapter = make_tiny("bert")
    ops = _ops(export_onnx(adapter, adapter.model, tmp_path / "m.onnx").path)
    assert ops["Transpose"] == 0
    assert ops["Where"] <= _ops(export_fp32(adapter, tmp_path / "p.onnx").path)["Where"] - 2 * TINY_LAYERS["bert"] + 1


def test_padding_is_exact_per_token(make_tiny, texts, tmp_path):
    """A batch whose texts have very different lengths: every real token's vector and the pooled embedding
    equal torch's, and the short text's result does not depend on the batch it is padded in."""
    adapter = make_tiny("bert")
    path = export_onnx(adapter, adapter.model, tmp_path / "m.onnx").path
    mixed = adapter.make_batches([texts[0][:12], texts[1] * 3], 2)[0]
    alone = adapter.make_batches([texts[0][:12]], 1)[0]
    (pooled, tokens), = _onnx_all(path, [mixed])[:1]
    want_pooled, want_tokens = _torch_outputs(adapter, adapter.model, [mixed])[0]
    real = mixed.inputs["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(tokens[real], want_tokens[real], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-4, atol=2e-5)
    single = _onnx_all(path, [alone])[0][0]
    np.testing.assert_allclose(pooled[0], single[0], rtol=1e-4, atol=2e-5)


def test_compressed_export_keeps_the_lowering_and_its_kernels(make_tiny, batches, tmp_path):
    """int8 / int4 kernels and the fused attention together: MultiHeadAttention per layer, kernels as before,
    outputs equal torch's compressed model."""
    adapter = make_tiny("bert")
    units = {n: UnitSpec(bits=4, group_size=32) for n in adapter.unit_names if "attention" in n}
    units |= {n: UnitSpec(bits=8, kernel="int8") for n in adapter.unit_names if "intermediate" in n}
    model = apply_plan(adapter, CompressionPlan(units=units))
    info = export_onnx(adapter, model, tmp_path / "m.onnx")
    assert count_fused(onnx.load(str(info.path))) == TINY_LAYERS["bert"]
    assert info.n_matmulnbits > 0 and info.n_dynamic_int8 > 0
    got = onnx_outputs(info.path, batches(adapter))
    with torch.no_grad():
        want = torch.cat([adapter.output(model, b) for b in batches(adapter)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)


def test_unfused_switch_writes_torchs_graph(make_tiny, tmp_path):
    adapter = make_tiny("bert")
    ops = _ops(export_onnx(adapter, adapter.model, tmp_path / "m.onnx", fused=False).path)
    assert ops["MultiHeadAttention"] == 0 and ops["IsNaN"] == TINY_LAYERS["bert"]


class _Causal(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(x.shape)


def test_calls_the_fused_node_does_not_cover_fall_back_to_torch(tmp_path):
    """A causal call keeps torch's own decomposition (same outputs), the lowering is counted as a fallback."""
    model, x = _Causal().eval(), torch.randn(2, 5, 16)
    with fused_attention() as sym, torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp_path / "c.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    assert sym is not None and sym.n_fused == 0 and sym.n_fallback == 1
    assert _ops(tmp_path / "c.onnx")["MultiHeadAttention"] == 0
    got = _onnx_all(tmp_path / "c.onnx", [Batch({"x": x})])[0][0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def _layout_graph(target: list[int]) -> onnx.GraphProto:
    """x (2, 3, 4, 5) -> Transpose 0213 -> Reshape(target) -> Transpose 0213 -> Neg -> y."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], target)
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["t1", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t2"], perm=[0, 2, 1, 3]),
             helper.make_node("Neg", ["t2"], ["y"])]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])


def test_layout_pairs_cancel_only_through_a_proven_no_op_reshape():
    """Transpose -> Reshape -> inverse Transpose cancels when the Reshape keeps its input's shape (0 entries
    copy it), and stays when the Reshape really moves data (a constant that is not proven equal)."""
    g = _layout_graph([0, 0, 0, -1])
    assert cancel_layout_pairs(g) == 2
    assert [n.op_type for n in g.node] == ["Neg"] and g.node[0].input[0] == "x"
    g = _layout_graph([2, 3, 4, 5])  # numerically a different layout: (2, 4, 3, 5) read as (2, 3, 4, 5)
    assert cancel_layout_pairs(g) == 0
    assert [n.op_type for n in g.node] == ["Transpose", "Reshape", "Transpose", "Neg"]
