"""ONNX export of frequency-tiered embedding tables: standard onnxruntime operators, bit-exact rows, file within
the onnx accounting."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")

from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.embedding_tiers import Tier, TieredEmbedding, TierSpec, TokenRanking  # noqa: E402
from slimformer.compression.memory import plan_memory, set_deploy  # noqa: E402
from slimformer.compression.plan import CompressionPlan, UnitSpec  # noqa: E402
from slimformer.export import export_onnx, graph_overhead_bytes, onnx_outputs  # noqa: E402
from slimformer.export.tiered import lower_tiered_embedding  # noqa: E402

EMB = "embeddings.word_embeddings"


def _tiers(vocab: int, *tiers: Tier) -> TierSpec:
    return TierSpec(tiers, TokenRanking(vocab, tuple(range(2000, 1000, -1)), "test"))


LAYOUTS = {
    "int8 / int4 g16 / int2 g16": (Tier("int8", 300), Tier("int4", 500, 16), Tier("int2", None, 16)),
    "int4 per row / int8 g32 / int2 g64": (Tier("int4", 700), Tier("int8", 200, 32), Tier("int2", None, 64)),
    "int2 g32 only": (Tier("int2", None, 32),),
    "int4 g24 (no block) / int2 g48": (Tier("int4", 900, 24), Tier("int2", None, 48)),
    "int4 g16 / pq d8": (Tier("int4", 600, 16), Tier("pq", None, 8)),
    "int8 / pq d4 / int2 g16": (Tier("int8", 300, 16), Tier("pq", 1500, 4), Tier("int2", None, 16)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tiered_rows_are_bit_exact_in_onnxruntime(name) -> None:
    vocab, dim = 3000, 64
    torch.manual_seed(1)
    mod = TieredEmbedding(vocab, dim, _tiers(vocab, *LAYOUTS[name]))
    mod.set_table(torch.randn(vocab, dim))
    low = lower_tiered_embedding("ids", "y", "emb", mod)
    graph = helper.make_graph(low.nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])],
                              low.initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([list(range(0, 3000, 7))[:400], list(range(1999, 1599, -1))], dtype=np.int64)
    y = sess.run(None, {"ids": ids})[0]
    assert np.array_equal(y, mod.weight.detach().numpy()[ids])
    assert "GatherBlockQuantized" in {n.op_type for n in low.nodes} or name.startswith("int4 g24")


@pytest.mark.parametrize("layout", ["int8 / int4 g16 / int2 g16", "int4 g16 / pq d8"])
def test_tiered_plan_exports_exactly_and_within_the_accounting(bert64, texts, tmp_path, layout) -> None:
    vocab, _ = bert64.unit(EMB).shape
    plan = CompressionPlan({EMB: UnitSpec(tiers=_tiers(vocab, *LAYOUTS[layout])),
                            **{u.name: UnitSpec(bits=8) for u in bert64.units if u.kind == "linear"}})
    model = apply_plan(bert64, plan)
    info = export_onnx(bert64, model, tmp_path / "tiered.onnx")
    if layout.endswith("pq d8"):
        assert "pqx29922:pq(d=8)" in info.kernels[EMB]
    else:
        assert info.kernels[EMB].startswith(
            "tiered[int8x300:Gather(int8)+Cast+Mul, int4x500:GatherBlockQuantized(bits=4")
        assert "int2x29722:GatherBlockQuantized(bits=2,block=16)" in info.kernels[EMB]
    batches = bert64.make_batches(texts[:16], 8)
    with torch.no_grad():
        ref = torch.cat([bert64.export_outputs(model, b)[0] for b in batches]).numpy()
    out = onnx_outputs(info.path, batches)
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    set_deploy(bert64, "onnx", graph_overhead_bytes(bert64))
    try:
        mem = plan_memory(bert64, plan)
    finally:
        set_deploy(bert64, "safetensors")
    margin = mem.total_bytes - info.file_bytes
    # the graph-bytes bound of a tier is loose against this tiny (0.5 MB) model's file: 1% of it, plus 2% per pq tier
    assert 0 <= margin <= (0.03 if "pq" in layout else 0.01) * info.file_bytes, (info.file_bytes, mem.total_bytes)
