"""ONNX Runtime kernels for slimformer's stored weight formats, built from a module's integer codes/scales.

Every builder is exact with respect to the torch model's effective weight `codes * scale` (the
kernels run fp32 activations; none of them quantises activations), and returns the initializers and
nodes that replace one fp32 MatMul / Gemm / Gather. Layouts (verified numerically against numpy in
tests/export):

* `com.microsoft.MatMulNBits` (bits 2, 4 or 8; ORT 1.32's CPU kernel refuses 3: "Only 2b, 4b and 8b
  quantization is supported"): B uint8 (N, k_blocks, block*bits/8), codes stored as code + 2^(bits-1) (the
  kernel's default zero point when no zero_points input is given: 2, 8 or 128), 4-bit pairs low nibble first,
  2-bit codes four per byte from the low bits (all four levels [-2, 1]; scales may be negative); scales
  float32 (N, k_blocks); K need not be a multiple of the block (the last block is zero padded: code 0 ->
  stored 2/8/128 -> 0). block_size must be a power of two >= 16, so a group that is not one is re-blocked
  with its scale repeated g/block times (exact) and one scale per row is re-blocked with the block that
  minimises bytes (exact: every block of a row has the same scale). accuracy_level=1 (fp32 compute);
  level 4 quantises activations to int8 (faster, not exact).
* `DequantizeLinear` (int8 codes (N, K), one scale per row, axis 0) -> `Gemm(transB=1)` on the input
  flattened to 2-D. ORT fuses `DequantizeLinear -> MatMul` into an accuracy-level-4 MatMulNBits (int8
  activations, ~6e-3 relative error per matmul), but not `DequantizeLinear -> Gemm`, so this form stays
  exact; the int8 weight stays resident and is dequantised per call into a transient buffer.
* `DequantizeLinear` with `block_size` (opset 21, int4 or int8 codes): any group size, the fallback
  for groups without a power-of-two factor >= 16.
* `com.microsoft.GatherBlockQuantized` (embedding tables, bits 4 or 8): data uint8 (V, D*bits/8) with
  the same +2^(bits-1) offset (its default zero point for uint8 data), scales (V, ceil(D/block)).
* int8 table with one scale per row: Gather(codes) -> Cast -> Mul(Gather(scales)), no repeated scales.
* 3-bit linears (and 2-bit ones without an exact MatMulNBits block): `unpack_gemm`, the codes as a packed
  little-endian bit stream (uint8, ceil(N*K*bits/8) bytes) that a constant subgraph of standard integer ops
  (Cast, Mul, ReduceSum, Div, Mod) unpacks to int8 codes when the session loads (constant folding), then
  `DequantizeLinear` (per row or blocked) -> `Gemm` as above: the file holds the packed bits, the session
  int8 codes; exact.

Per unit, `UnitSpec.kernel` picks the compute: 'exact' (the above) or 'int8' (`dynamic_int8` below; with the
unit's own SmoothQuant factors when `UnitSpec.smooth` is set, stored on the module from calibration data: the
torch model computes the same thing, `compression.ops.int8_linear`, so the search scores it).
The exporter follows each unit's kernel unless a mode overrides every unit.

Kernel modes (overrides): 'exact' (the above) and 'fast': every int4/int8 linear runs as
`com.microsoft.DynamicQuantizeMatMul` (ORT's int8 GEMM, the kernel its dynamic int8 models use) on int8
weights that a constant subgraph widens from the stored codes when the session loads (file: the codes as
stored; memory: int8), with SmoothQuant factors from calibration activations. Activations are quantised
per tensor at run time, so 'fast' is not exact (see `dynamic_int8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from slimformer.compression.ops import (
    SMOOTH_ALPHA,
    code_range,
    int8_weight_qmax,
    pack_codes,
    pack_int4,
    pack_nibbles,
    smoothing_factors,
)

MS_DOMAIN = "com.microsoft"
MIN_BLOCK, MAX_BLOCK = 16, 256  # MatMulNBits / GatherBlockQuantized blocks: powers of two, MLAS up to 256
KERNEL_MODES = ("exact", "fast")
PER_UNIT = "per-unit"  # no override: each unit's own kernel (what export and records call it)


def unit_kernel_mode(kernel: str) -> str:
    """The lowering mode of a unit's compute kernel: 'int8' lowers as the fast (dynamic int8) kernel."""
    return "fast" if kernel == "int8" else "exact"


@dataclass
class Lowered:
    """What replaces one weight use: new initializers, nodes, and the kernel's name."""

    kernel: str
    initializers: list[TensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)


# -- block choice ------------------------------------------------------------------------------------
def nbits_block(k: int, group: int | None, bits: int) -> int | None:
    """Power-of-two block (16..256) that reproduces the unit's scales exactly, or None.

    Per-group scales: the largest power of two dividing the group (its scale repeated group/block
    times). One scale per row: the block whose (padded codes + repeated scales) bytes are smallest.
    """
    if group is not None and group < k:
        b = group & -group
        return min(b, MAX_BLOCK) if b >= MIN_BLOCK else None
    best, best_bytes = MIN_BLOCK, None
    b = MIN_BLOCK
    while b <= MAX_BLOCK:
        nb = -(-k // b)
        cost = nb * (b * bits // 8 + 4)
        if best_bytes is None or cost <= best_bytes:
            best, best_bytes = b, cost
        b *= 2
    return best


def block_scales(scales: np.ndarray, k: int, group: int | None, block: int) -> np.ndarray:
    """(rows, n_groups) scales -> (rows, ceil(k/block)) scales of `block`-wide blocks (exact when each
    block lies inside one group)."""
    g = k if group is None else group
    starts = np.arange(-(-k // block)) * block
    return np.ascontiguousarray(scales[:, starts // g], dtype=np.float32)


def dequantized(codes: np.ndarray, scales: np.ndarray, group: int | None) -> np.ndarray:
    """codes * scale of their group, float32 (what every kernel here computes with)."""
    k = codes.shape[1]
    g = k if group is None else group
    return codes.astype(np.float32) * np.repeat(scales, g, axis=1)[:, :k]


def _offset_codes(codes: np.ndarray, bits: int, width: int) -> np.ndarray:
    """int codes (rows, k) -> uint8 code + 2^(bits-1), zero padded (code 0) to `width` columns."""
    rows, k = codes.shape
    out = np.full((rows, width), 1 << (bits - 1), dtype=np.uint8)
    out[:, :k] = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return out


def _pack_rows(u: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis even -> that axis halved, element 2i in the low nibble (row-major, so
    compression's flat packer gives the same bytes per row)."""
    packed = pack_nibbles(torch.from_numpy(np.ascontiguousarray(u))).numpy()
    return packed.reshape(*u.shape[:-1], u.shape[-1] // 2)


def int4_tensor(name: str, codes: np.ndarray) -> TensorProto:
    """ONNX INT4 tensor (two's complement nibbles, first element low) from int codes in [-8, 7]."""
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.INT4
    t.dims.extend(codes.shape)
    t.raw_data = pack_int4(torch.from_numpy(np.ascontiguousarray(codes))).numpy().tobytes()
    return t


def f32(name: str, a: np.ndarray) -> TensorProto:
    return nh.from_array(np.ascontiguousarray(a, dtype=np.float32), name)


def i64(name: str, values: list[int]) -> TensorProto:
    return nh.from_array(np.asarray(values, dtype=np.int64), name)


# -- linear ------------------------------------------------------------------------------------------
def matmul_nbits(x: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int,
                 group: int | None, block: int, bias: str | None = None) -> Lowered:
    """y = x @ W^T (+ bias) with W (N, K) = codes * scales, as one MatMulNBits."""
    n, k = codes.shape
    nb = -(-k // block)
    if bits == 2:  # code + 2, four per byte from the low bits (compression's bit-stream packer, per block)
        padded = np.zeros((n, nb * block), dtype=np.int8)
        padded[:, :k] = codes
        packed = pack_codes(torch.from_numpy(padded), 2).numpy().reshape(n, nb, block // 4)
    else:
        u = _offset_codes(codes, bits, nb * block).reshape(n, nb, block)
        packed = _pack_rows(u) if bits == 4 else u
    inits = [nh.from_array(np.ascontiguousarray(packed), f"{p}.qweight"),
             f32(f"{p}.scales", block_scales(scales, k, group, block))]
    inputs = [x, f"{p}.qweight", f"{p}.scales"]
    if bias is not None:
        inputs += ["", "", bias]
    node = helper.make_node("MatMulNBits", inputs, [y], name=f"{p}/MatMulNBits", domain=MS_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=1)
    return Lowered(f"MatMulNBits(bits={bits},block={block})", inits, [node])


def dequant_gemm(x: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int,
                 group: int | None, bias: str | None = None, unpacked: Lowered | None = None) -> Lowered:
    """y = x @ W^T (+ bias): DequantizeLinear(codes (N, K)) -> Gemm(transB=1) on x reshaped to 2-D.

    One scale per row uses DequantizeLinear axis 0 (opset 13); groups use axis 1 with block_size
    (opset 21; int4 codes are an INT4 tensor, opset 21 too). `unpacked`: a subgraph whose output
    `{p}/codes8` holds the int8 codes (3/2-bit bit streams, `unpack_codes`) instead of a codes initializer."""
    n, k = codes.shape
    if unpacked is not None:
        pre_inits, pre_nodes, q_name = list(unpacked.initializers), list(unpacked.nodes), f"{p}/codes8"
    else:
        q = int4_tensor(f"{p}.qweight", codes) if bits == 4 else nh.from_array(
            np.ascontiguousarray(codes, dtype=np.int8), f"{p}.qweight")
        pre_inits, pre_nodes, q_name = [q], [], q.name
    if group is None or group >= k:
        s = f32(f"{p}.scales", scales[:, 0])
        dq = helper.make_node("DequantizeLinear", [q_name, s.name], [f"{p}/w"], name=f"{p}/Dequantize", axis=0)
    else:
        s = f32(f"{p}.scales", scales)
        dq = helper.make_node("DequantizeLinear", [q_name, s.name], [f"{p}/w"], name=f"{p}/Dequantize",
                              axis=1, block_size=group)
    flat, out_shape = f"shape.-1x{k}", f"shape.{n}"
    inits = [*pre_inits, s, i64(flat, [-1, k]), i64(out_shape, [n])]
    gemm_in = [f"{p}/x2d", f"{p}/w"] + ([bias] if bias is not None else [])
    nodes = [
        *pre_nodes,
        dq,
        helper.make_node("Reshape", [x, flat], [f"{p}/x2d"], name=f"{p}/Flatten"),
        helper.make_node("Gemm", gemm_in, [f"{p}/y2d"], name=f"{p}/Gemm", transB=1),
        helper.make_node("Shape", [x], [f"{p}/lead"], name=f"{p}/Shape", start=0, end=-1),
        helper.make_node("Concat", [f"{p}/lead", out_shape], [f"{p}/yshape"], name=f"{p}/Concat", axis=0),
        helper.make_node("Reshape", [f"{p}/y2d", f"{p}/yshape"], [y], name=f"{p}/Unflatten"),
    ]
    kind = "per-row" if group is None or group >= k else f"group={group}"
    head = f"unpack(int{bits})+DequantizeLinear(int8" if unpacked is not None else f"DequantizeLinear(int{bits}"
    return Lowered(f"{head},{kind})+Gemm", inits, nodes)


def unpack_codes(p: str, codes: np.ndarray, bits: int) -> Lowered:
    """Initializer + constant subgraph whose output `{p}/codes8` is `codes` (N, K) as int8: the codes stored as
    `compression.ops.pack_codes` writes them (code - min as a little-endian bit stream, ceil(N*K*bits/8) bytes),
    grouped into words of `per` codes (8 at 3 bits, 4 at 2 bits) read with integer Mul/ReduceSum, split with
    Div/Mod by powers of 2^bits, shifted back by the code minimum and cropped. Every input is constant, so ONNX
    Runtime folds it when the session loads; the file holds the packed bits only."""
    n, k = codes.shape
    qmin, _ = code_range(bits)
    per = 8 // int(np.gcd(8, bits))
    n_bytes = per * bits // 8
    numel = n * k
    words = -(-numel // per)
    packed = pack_codes(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8)), bits).numpy()
    inits = [nh.from_array(packed, f"{p}.qbits"),
             i64(f"{p}.qbits_pad", [0, words * n_bytes - packed.size]),
             i64(f"shape.words{n_bytes}", [-1, n_bytes]),
             nh.from_array(np.asarray([256 ** i for i in range(n_bytes)], dtype=np.int32), f"const.bytes{n_bytes}"),
             nh.from_array(np.asarray([(1 << bits) ** i for i in range(per)], dtype=np.int32),
                           f"const.levels{bits}x{per}"),
             nh.from_array(np.asarray(1 << bits, dtype=np.int32), f"const.mod{bits}"),
             nh.from_array(np.asarray(qmin, dtype=np.int32), f"const.qmin{bits}"),
             i64("axes.1", [1]), i64("const.0", [0]), i64(f"shape.{numel}", [numel]), i64(f"{p}.shape2", [n, k])]
    nodes = [
        helper.make_node("Pad", [f"{p}.qbits", f"{p}.qbits_pad"], [f"{p}/qb"], name=f"{p}/PadBytes"),
        helper.make_node("Cast", [f"{p}/qb"], [f"{p}/qb32"], name=f"{p}/BytesToInt", to=TensorProto.INT32),
        helper.make_node("Reshape", [f"{p}/qb32", f"shape.words{n_bytes}"], [f"{p}/qw"], name=f"{p}/Words"),
        helper.make_node("Mul", [f"{p}/qw", f"const.bytes{n_bytes}"], [f"{p}/qws"], name=f"{p}/ByteWeights"),
        helper.make_node("ReduceSum", [f"{p}/qws", "axes.1"], [f"{p}/word"], name=f"{p}/Word", keepdims=1),
        helper.make_node("Div", [f"{p}/word", f"const.levels{bits}x{per}"], [f"{p}/hi"], name=f"{p}/Shift"),
        helper.make_node("Mod", [f"{p}/hi", f"const.mod{bits}"], [f"{p}/lv"], name=f"{p}/Level"),
        helper.make_node("Add", [f"{p}/lv", f"const.qmin{bits}"], [f"{p}/cv"], name=f"{p}/Recentre"),
        helper.make_node("Reshape", [f"{p}/cv", "shape.-1"], [f"{p}/cflat"], name=f"{p}/Flat"),
        helper.make_node("Slice", [f"{p}/cflat", "const.0", f"shape.{numel}"], [f"{p}/ccrop"], name=f"{p}/Crop"),
        helper.make_node("Reshape", [f"{p}/ccrop", f"{p}.shape2"], [f"{p}/c2"], name=f"{p}/Matrix"),
        helper.make_node("Cast", [f"{p}/c2"], [f"{p}/codes8"], name=f"{p}/ToInt8", to=TensorProto.INT8),
    ]
    inits.append(i64("shape.-1", [-1]))
    return Lowered(f"unpack(int{bits})", inits, nodes)


def smoothing(act_max: np.ndarray, w: np.ndarray, alpha: float = SMOOTH_ALPHA) -> np.ndarray:
    """SmoothQuant factors s (K,) of the fast kernels: `compression.ops.smoothing_factors` (the one rule, which
    per-unit smoothing uses too) on numpy arrays. SMOOTH_ALPHA: 0.7-0.85 measured alike on MiniLM."""
    return smoothing_factors(torch.from_numpy(np.asarray(act_max, dtype=np.float32)),
                             torch.from_numpy(np.asarray(w, dtype=np.float32)), alpha).numpy()


def dynamic_int8(x: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int, group: int | None,
                 bias: str | None = None, smooth: np.ndarray | None = None, wp: str | None = None,
                 xs: str | None = None, qmax: int | None = None) -> Lowered:
    """y ~ x @ W^T (+ bias) on onnxruntime's int8 GEMM (`com.microsoft.DynamicQuantizeMatMul`): NOT exact.

    The file keeps the stored codes (INT4 / INT8 (N, K) and the group scales). A constant subgraph,
    folded by ONNX Runtime when the session loads, widens them to W = codes * scale (times the smoothing
    factors `smooth` when given), requantises W to int8 with one scale per output row and transposes it;
    so the session holds int8 weights (a 4-bit unit costs twice its file bytes in memory). At run time
    x (divided by `smooth`) is quantised to uint8 per tensor, like ORT's dynamic int8 models. The weight
    subgraph is named by `wp` (default `p`): the uses of a shared module pass the same `wp`, so it is built
    (and folded, and kept in memory) once. `xs` names the smoothed input: linears that read one input with one
    set of factors (query/key/value) pass the same name, so x / smooth is computed once for all of them.
    `qmax`: the requantised codes' range (+-qmax), by default this machine's (compression.ops.int8_weight_qmax: 64
    on x86 without VNNI, where ORT's int16 pair sums would saturate, else 127), as torch simulates it.
    """
    use, p = p, wp or p
    qmax = qmax or int8_weight_qmax()
    qmax_name = f"const.{qmax}"
    n, k = codes.shape
    g = k if group is None or group >= k else group
    ng = -(-k // g)
    kp = ng * g
    padded = np.zeros((n, kp), dtype=np.int8)
    padded[:, :k] = codes
    q = int4_tensor(f"{p}.qweight", padded) if bits == 4 else nh.from_array(padded, f"{p}.qweight")
    inits = [q, f32(f"{p}.scales", np.asarray(scales, dtype=np.float32).reshape(n, ng, 1)),
             i64(f"{p}.shape3", [n, ng, g]), i64(f"{p}.shape2", [n, kp]), i64("axes.1", [1]),
             f32(qmax_name, np.asarray(float(qmax))), f32("const.tiny", np.asarray(1e-30))]
    w = f"{p}/w"
    nodes = [helper.make_node("Cast", [q.name], [f"{p}/codes"], name=f"{p}/Widen", to=TensorProto.FLOAT),
             helper.make_node("Reshape", [f"{p}/codes", f"{p}.shape3"], [f"{p}/codes3"], name=f"{p}/Groups"),
             helper.make_node("Mul", [f"{p}/codes3", f"{p}.scales"], [f"{p}/w3"], name=f"{p}/GroupScale"),
             helper.make_node("Reshape", [f"{p}/w3", f"{p}.shape2"], [w], name=f"{p}/Ungroup")]
    if kp != k:
        inits += [i64("const.0", [0]), i64(f"shape.{k}", [k])]
        nodes.append(helper.make_node("Slice", [w, "const.0", f"shape.{k}", "axes.1"], [f"{p}/wk"], name=f"{p}/Crop"))
        w = f"{p}/wk"
    if smooth is not None:
        inits.append(f32(f"{p}.smooth", np.asarray(smooth, dtype=np.float32).reshape(1, k)))
        nodes += [helper.make_node("Mul", [w, f"{p}.smooth"], [f"{p}/ws"], name=f"{p}/SmoothWeight"),
                  helper.make_node("Reciprocal", [f"{p}.smooth"], [f"{p}/inv"], name=f"{p}/InvSmooth"),
                  helper.make_node("Mul", [x, f"{p}/inv"], [xs or f"{use}/xs"], name=f"{use}/SmoothInput")]
        w, x = f"{p}/ws", xs or f"{use}/xs"
    nodes += [helper.make_node("Abs", [w], [f"{p}/absw"], name=f"{p}/Abs"),
              helper.make_node("ReduceMax", [f"{p}/absw", "axes.1"], [f"{p}/rowmax"], name=f"{p}/RowMax",
                               keepdims=0),
              helper.make_node("Max", [f"{p}/rowmax", "const.tiny"], [f"{p}/rowmax1"], name=f"{p}/NonZero"),
              helper.make_node("Div", [f"{p}/rowmax1", qmax_name], [f"{p}/s8"], name=f"{p}/Scale8"),
              helper.make_node("Unsqueeze", [f"{p}/s8", "axes.1"], [f"{p}/s8col"], name=f"{p}/ScaleCol"),
              helper.make_node("Div", [w, f"{p}/s8col"], [f"{p}/wq"], name=f"{p}/Requantise"),
              helper.make_node("Round", [f"{p}/wq"], [f"{p}/wr"], name=f"{p}/Round"),
              helper.make_node("Cast", [f"{p}/wr"], [f"{p}/w8"], name=f"{p}/ToInt8", to=TensorProto.INT8),
              helper.make_node("Transpose", [f"{p}/w8"], [f"{p}/w8t"], name=f"{p}/Transpose", perm=[1, 0]),
              helper.make_node("DynamicQuantizeMatMul", [x, f"{p}/w8t", f"{p}/s8", "", bias or ""], [y],
                               name=f"{use}/DynamicQuantizeMatMul", domain=MS_DOMAIN)]
    smooth_note = ",smoothed" if smooth is not None else ""
    return Lowered(f"DynamicQuantizeMatMul(int{bits} stored,int8 resident{smooth_note})", inits, nodes)


def fp16_matmul(x: str, y: str, p: str, w_t: np.ndarray) -> Lowered:
    """fp16 weight (K, N) cast to fp32 for the MatMul (ORT folds the Cast at load: fp32 resident)."""
    w = nh.from_array(np.ascontiguousarray(w_t, dtype=np.float16), f"{p}.weight_fp16")
    nodes = [helper.make_node("Cast", [w.name], [f"{p}/w"], name=f"{p}/Cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", [x, f"{p}/w"], [y], name=f"{p}/MatMul")]
    return Lowered("fp16 weight + Cast + MatMul", [w], nodes)


# -- embedding ---------------------------------------------------------------------------------------
def gather_block_quantized(ids: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int,
                           group: int | None, block: int) -> Lowered:
    """y = table[ids] with table (V, D) = codes * scales, as one GatherBlockQuantized."""
    v, d = codes.shape
    u = _offset_codes(codes, bits, d + (d % 2 if bits == 4 else 0))
    data = _pack_rows(u) if bits == 4 else u
    inits = [nh.from_array(np.ascontiguousarray(data), f"{p}.qweight"),
             f32(f"{p}.scales", block_scales(scales, d, group, block))]
    node = helper.make_node("GatherBlockQuantized", [inits[0].name, ids, inits[1].name], [y], name=f"{p}/Gather",
                            domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    return Lowered(f"GatherBlockQuantized(bits={bits},block={block})", inits, [node])


def gather_dequant(ids: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, group: int | None
                   ) -> Lowered:
    """y = Cast(codes[ids]) * scales[ids] with int8 codes (any group size; int4 codes stored as int8)."""
    v, d = codes.shape
    q = nh.from_array(np.ascontiguousarray(codes, dtype=np.int8), f"{p}.qweight")
    s = f32(f"{p}.scales", scales)
    nodes = [helper.make_node("Gather", [q.name, ids], [f"{p}/q"], name=f"{p}/GatherCodes", axis=0),
             helper.make_node("Cast", [f"{p}/q"], [f"{p}/qf"], name=f"{p}/Cast", to=TensorProto.FLOAT),
             helper.make_node("Gather", [s.name, ids], [f"{p}/s"], name=f"{p}/GatherScales", axis=0)]
    inits = [q, s]
    scale_out = f"{p}/s"
    if scales.shape[1] > 1:
        g = d if group is None else group
        gidx = i64(f"{p}.group_index", list(np.arange(d) // g))
        inits.append(gidx)
        nodes.append(helper.make_node("Gather", [f"{p}/s", gidx.name], [f"{p}/sx"], name=f"{p}/ExpandScales",
                                      axis=-1))
        scale_out = f"{p}/sx"
    nodes.append(helper.make_node("Mul", [f"{p}/qf", scale_out], [y], name=f"{p}/Mul"))
    return Lowered("Gather(int8)+Cast+Mul", inits, nodes)


def fp16_gather(ids: str, y: str, p: str, table: np.ndarray) -> Lowered:
    """fp16 table gathered then cast (the table stays fp16 in memory)."""
    w = nh.from_array(np.ascontiguousarray(table, dtype=np.float16), f"{p}.weight_fp16")
    nodes = [helper.make_node("Gather", [w.name, ids], [f"{p}/h"], name=f"{p}/Gather", axis=0),
             helper.make_node("Cast", [f"{p}/h"], [y], name=f"{p}/Cast", to=TensorProto.FLOAT)]
    return Lowered("fp16 Gather + Cast", [w], nodes)


# -- choice ------------------------------------------------------------------------------------------
LINEAR_KERNELS = ("matmul", "fp16_matmul", "matmulnbits", "dequant_gemm", "dynamic_int8", "unpack_gemm")
EMBEDDING_KERNELS = ("gather", "fp16_gather", "gather_block_quantized", "gather_dequant")


@dataclass(frozen=True)
class KernelChoice:
    """Which ONNX Runtime kernel one weight use lowers to, decided from its format and shape alone.

    kind: the kernel class (one of LINEAR_KERNELS / EMBEDDING_KERNELS; what the latency model prices);
    bits: 32, 16, 8 or 4; block: the MatMulNBits / GatherBlockQuantized block (None for other kernels);
    group: the quantisation group as stored (None = one scale per row); opset: the minimum
    default-domain opset the kernel needs.
    """

    kind: str
    bits: int
    block: int | None = None
    group: int | None = None
    opset: int = 13


def choose_linear_kernel(bits: int, group_size: int | None, in_features: int, out_features: int,
                         int8_kernel: str = "auto", mode: str = "exact") -> KernelChoice:
    """The kernel an `out_features x in_features` linear stored at `bits` (groups along the input) runs as.

    fp32 -> MatMul/Gemm; fp16 -> fp16 weight + Cast + MatMul (folded to fp32 at load); int4: MatMulNBits
    whenever a power-of-two block represents the scales exactly, else blocked DequantizeLinear + Gemm;
    int8 ('auto'): one scale per row -> DequantizeLinear + Gemm (measured fastest exact int8 form), groups
    -> MatMulNBits(bits=8) (or blocked DequantizeLinear + Gemm). The exporter and the latency model both
    use this, so they cannot disagree. mode 'fast': every int4/int8 linear -> DynamicQuantizeMatMul on int8
    weights widened from the stored codes at load ("dynamic_int8": activations quantised, not exact).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)} (got {mode!r})")
    if mode == "fast" and bits in (4, 8):
        per_row = group_size is None or group_size >= in_features
        return KernelChoice("dynamic_int8", bits, None, None if per_row else group_size, 21 if bits == 4 else 18)
    del out_features  # not needed by today's rules; part of the contract for shape-dependent choices
    if bits == 32:
        return KernelChoice("matmul", 32)
    if bits == 16:
        return KernelChoice("fp16_matmul", 16)
    k = in_features
    per_row = group_size is None or group_size >= k
    group = None if per_row else group_size
    block = nbits_block(k, group_size, bits)
    if bits == 3 or (bits == 2 and block is None):  # no MatMulNBits for them: bit stream unpacked at load
        return KernelChoice("unpack_gemm", bits, None, group, 21 if not per_row else 13)
    use_nbits = block is not None and not (bits == 8 and (int8_kernel == "dequantize"
                                                           or (int8_kernel == "auto" and per_row)))
    if use_nbits:
        return KernelChoice("matmulnbits", bits, block, group, 1)
    return KernelChoice("dequant_gemm", bits, None, group, 21 if (bits == 4 or not per_row) else 13)


def choose_embedding_kernel(bits: int, group_size: int | None, dim: int) -> KernelChoice:
    """The kernel a `vocab x dim` table stored at `bits` runs as: GatherBlockQuantized when a power-of-two
    block is exact, an int8 table with one scale per row (or no exact block) as Gather + Cast + Mul."""
    if bits == 32:
        return KernelChoice("gather", 32)
    if bits == 16:
        return KernelChoice("fp16_gather", 16)
    block = nbits_block(dim, group_size, bits)
    per_row = group_size is None or group_size >= dim
    group = None if per_row else group_size
    if (bits == 8 and per_row) or block is None or (bits == 4 and dim % 2):
        return KernelChoice("gather_dequant", bits, None, group)
    return KernelChoice("gather_block_quantized", bits, block, group, 1)


def lower_linear(x: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int, group: int | None,
                 bias: str | None = None, int8_kernel: str = "auto", mode: str = "exact",
                 smooth: np.ndarray | None = None, wp: str | None = None, xs: str | None = None,
                 qmax: int | None = None
                 ) -> tuple[Lowered, int]:
    """The kernel for one int4/int8 linear (as `choose_linear_kernel` decides) and the opset it needs;
    `smooth` (SmoothQuant factors) and `xs` (the smoothed input's name) apply to the fast kernel only."""
    n, k = codes.shape
    choice = choose_linear_kernel(bits, group, k, n, int8_kernel, mode)
    if choice.kind == "dynamic_int8":
        return dynamic_int8(x, y, p, codes, scales, bits, group, bias, smooth, wp, xs, qmax), choice.opset
    if choice.kind == "matmulnbits":
        return matmul_nbits(x, y, p, codes, scales, bits, group, choice.block, bias), choice.opset  # type: ignore[arg-type]
    unpacked = unpack_codes(p, codes, bits) if choice.kind == "unpack_gemm" else None
    return dequant_gemm(x, y, p, codes, scales, bits, group, bias, unpacked), choice.opset


def lower_embedding(ids: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int,
                    group: int | None) -> Lowered:
    """The kernel for one int4/int8 table, as `choose_embedding_kernel` decides."""
    choice = choose_embedding_kernel(bits, group, codes.shape[1])
    if choice.kind == "gather_dequant":
        return gather_dequant(ids, y, p, codes, scales, group)
    return gather_block_quantized(ids, y, p, codes, scales, bits, group, choice.block)  # type: ignore[arg-type]
