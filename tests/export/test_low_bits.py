"""2- and 3-bit linear units (issue 15): at most 2^b levels, packed storage equal to the accounting, and ONNX
kernels that onnxruntime runs exactly (MatMulNBits bits=2; 3 bits and 2 bits without a power-of-two block as a
bit stream unpacked at load)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from slimformer.compression import ops  # noqa: E402
from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.memory import plan_memory, set_deploy  # noqa: E402
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec  # noqa: E402
from slimformer.compression.saving import pack_model, packed_bytes  # noqa: E402
from slimformer.errors import PlanError  # noqa: E402
from slimformer.export import export_onnx, graph_overhead_bytes, onnx_outputs  # noqa: E402
from slimformer.export import kernels as K  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group", [None, 16, 10])
def test_low_bit_codes_use_at_most_2_to_the_b_levels(bits: int, group: int | None) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.linspace(0.1, 2.0, 40)
    q = ops.quantize(w, bits, group)
    levels = q.codes.unique()
    assert levels.numel() <= 2 ** bits
    assert int(levels.min()) >= -(2 ** (bits - 1)) and int(levels.max()) < 2 ** (bits - 1)
    if bits == 2:  # all four levels are used on a random matrix (the symmetric grid would use three)
        assert levels.numel() == 4
    deq = ops.dequantize(q)
    assert torch.equal(deq, q.codes.float() * q.scales.repeat_interleave(group or 40, 1)[:, :40])
    err2, err4 = (deq - w).square().mean(), (ops.fake_quant(w, 4, group) - w).square().mean()
    assert err4 < err2 < w.square().mean()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 13, 1000])
def test_pack_codes_round_trip_and_size(bits: int, n: int) -> None:
    lo, hi = ops.code_range(bits)
    codes = torch.randint(lo, hi + 1, (n,), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = ops.pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(ops.unpack_codes(packed, n, bits), codes)
    with pytest.raises(PlanError, match=f"{bits}-bit codes must lie in"):
        if bits in (2, 3):
            ops.pack_codes(torch.tensor([hi + 1], dtype=torch.int8), bits)
        else:
            raise PlanError(f"{bits}-bit codes must lie in (packer checked elsewhere)")


def test_low_bits_are_for_linear_units_only(bert64) -> None:
    with pytest.raises(PlanError, match="bits 2 apply to linear units, not to embeddings.word_embeddings"):
        plan_memory(bert64, CompressionPlan({"embeddings.word_embeddings": UnitSpec(bits=2, group_size=32)}))
    with pytest.raises(PlanError, match="kernel 'int8' runs 8- or 4-bit weights"):
        UnitSpec(bits=3, kernel="int8")


def _plans(a) -> dict[str, CompressionPlan]:
    lin = [u.name for u in a.units if u.kind == "linear"]

    def every(**kw) -> CompressionPlan:
        return CompressionPlan({n: UnitSpec(**kw) for n in lin})

    return {
        "int2 g32": every(bits=2, group_size=32), "int2 per row": every(bits=2),
        "int3 g32": every(bits=3, group_size=32),
        "int3 per row": every(bits=3), "int2 g24 (no block)": every(bits=2, group_size=24),
        "int3 rank 16": every(bits=3, rank=16, group_size=16),
        "int2 + heads/neurons + sharing": CompressionPlan({n: UnitSpec(bits=2, group_size=32) for n in lin},
                                                          {0: LayerSpec(heads_kept=2, neurons_kept=96)},
                                                          SharingSpec(((0, 1),), "ffn")),
        "int3 sparse 2:4": every(bits=3, sparsity=0.5, pattern="2:4", group_size=32),
    }


def test_low_bit_plans_export_exactly_and_within_the_accounting(bert64, texts, tmp_path) -> None:
    batches = bert64.make_batches(texts[:8], 8)
    set_deploy(bert64, "onnx", graph_overhead_bytes(bert64))
    try:
        for name, plan in _plans(bert64).items():
            model = apply_plan(bert64, plan)
            # packed weights are exactly the safetensors accounting
            assert packed_bytes(pack_model(model)) == plan_memory(bert64, plan, "safetensors").total_bytes, name
            info = export_onnx(bert64, model, tmp_path / "m.onnx")
            assert info.unconverted == (), name
            kinds = set(info.kernels.values())
            if "int2 g32" == name or "int2 per row" == name:
                assert all(k.startswith("MatMulNBits(bits=2") for k in kinds), kinds
            if name.startswith("int3"):
                assert all(k.startswith("unpack(int3)") for k in kinds), kinds
            with torch.no_grad():
                ref = torch.cat([bert64.export_outputs(model, b)[0] for b in batches]).numpy()
            out = onnx_outputs(info.path, batches)
            assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), name
            mem = plan_memory(bert64, plan)
            assert 0 <= mem.total_bytes - info.file_bytes <= 0.05 * info.file_bytes, (name, info.file_bytes,
                                                                                        mem.total_bytes)
    finally:
        set_deploy(bert64, "safetensors")


def test_three_bit_stream_is_what_the_file_holds(tmp_path) -> None:
    """The 3-bit kernel's file holds ceil(N*K*3/8) code bytes (no int8 codes), unpacked exactly at load."""
    torch.manual_seed(2)
    w = torch.randn(20, 48)
    q = ops.quantize(w, 3, 16)
    low, opset = K.lower_linear("x", "y", "lin", q.codes.numpy(), q.scales.numpy(), 3, 16)
    code_inits = [t for t in low.initializers if t.name == "lin.qbits"]
    assert len(code_inits) == 1 and len(code_inits[0].raw_data) == (20 * 48 * 3 + 7) // 8
    assert not any(t.data_type == onnx.TensorProto.INT8 for t in low.initializers)
    x = np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32)
    g = onnx.helper.make_graph(low.nodes, "k", [onnx.helper.make_tensor_value_info("x", 1, [2, 5, 48])],
                               [onnx.helper.make_tensor_value_info("y", 1, [2, 5, 20])], low.initializers)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", max(opset, 21)),
                                                 onnx.helper.make_opsetid(K.MS_DOMAIN, 1)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ ops.dequantize(q).numpy().T
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_low_bit_modules_pack_and_unpack_to_the_same_weight(bert64) -> None:
    from slimformer.compression.modules import SlimLinear

    lin = [u.name for u in bert64.units if u.kind == "linear"]
    for bits, sparsity, pattern in ((2, 0.0, "unstructured"), (3, 0.7, "unstructured"), (2, 0.5, "2:4")):
        plan = CompressionPlan({n: UnitSpec(bits=bits, group_size=32, sparsity=sparsity, pattern=pattern) for n in lin})
        model = apply_plan(bert64, plan)
        for path, mod in model.named_modules():
            if isinstance(mod, SlimLinear) and mod.fmt.bits == bits:
                tensors = mod.pack(path)
                fresh = SlimLinear(mod.in_features, mod.out_features, fmt=mod.fmt)
                fresh.unpack(path, tensors)
                assert torch.equal(fresh.weight, mod.weight) and torch.equal(fresh.codes, mod.codes), (bits, path)
