"""Pure tensor kernels behind the compression transforms: SVD, pruning masks, quantisation, packing.

Every function takes float 2-D weights W of shape (out, in) (an embedding table is (vocab, dim) and "in"
means dim), works on W's device, is deterministic and returns new tensors without touching its inputs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slimformer.errors import PlanError

CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CLIP_RATIOS_LOW: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # 3/2 bits: few levels clip harder
QUANT_BITS: tuple[int, ...] = (8, 4, 3, 2)  # integer widths (codes + fp32 scales); 3/2 bits: linear units only


def _check_2d(W: Tensor, name: str = "W") -> None:
    if W.dim() != 2:
        raise PlanError(f"{name} must be a 2-D (out, in) weight tensor (got shape {tuple(W.shape)})")


def _check_mask(mask: Tensor, W: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != W.shape:
        raise PlanError(
            f"mask must be a bool tensor shaped like W {tuple(W.shape)} "
            f"(got {mask.dtype} {tuple(mask.shape)})"
        )


# ----------------------------------------------------------------------------------------------- SVD


@dataclass(frozen=True)
class SVDResult:
    """Thin SVD of W (or of W @ diag(col_scale) when data-aware); col_scale is None for plain SVD."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    col_scale: Tensor | None


def svd(W: Tensor, act_scale: Tensor | None = None) -> SVDResult:
    """Thin SVD of W in float64 (returned as float32); with act_scale s, decompose W @ diag(s) (ASVD)
    so truncation minimises the activation-weighted error instead of the plain Frobenius error."""
    _check_2d(W)
    M = W.detach().to(torch.float64)
    col_scale: Tensor | None = None
    if act_scale is not None:
        if act_scale.shape != (W.shape[1],):
            raise PlanError(
                f"act_scale must have shape ({W.shape[1]},) to match W {tuple(W.shape)} "
                f"(got {tuple(act_scale.shape)})"
            )
        s = act_scale.detach().to(device=W.device, dtype=torch.float64)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise PlanError(
                "act_scale must be finite and strictly positive; pass it through activation_scale"
            )
        M = M * s[None, :]
        col_scale = s.to(torch.float32)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVDResult(U.to(torch.float32), S.to(torch.float32), Vh.to(torch.float32), col_scale)


def lowrank_factors(res: SVDResult, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced rank-r factors (A (out, r), B (r, in)) with A @ B the best rank-r approximation of W
    (in the activation-weighted metric when col_scale is set); sqrt(S) is split so both quantise well."""
    full = res.S.shape[0]
    if not 1 <= rank <= full:
        raise PlanError(f"rank must be between 1 and {full} = min(out, in) for this weight (got {rank})")
    root = res.S[:rank].to(torch.float64).sqrt()
    A = res.U[:, :rank].to(torch.float64) * root[None, :]
    B = root[:, None] * res.Vh[:rank].to(torch.float64)
    if res.col_scale is not None:
        B = B / res.col_scale.to(torch.float64)[None, :]
    return A.to(torch.float32), B.to(torch.float32)


def activation_scale(x_abs_mean: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-feature mean |activation| -> strictly positive float32 scale with mean 1, so dead or
    non-finite features cannot zero out (or blow up) columns in data-aware SVD."""
    x = torch.nan_to_num(x_abs_mean.detach().to(torch.float32).abs(), nan=0.0, posinf=0.0)
    mean = x.mean()
    if not bool(mean > 0):
        return torch.ones_like(x)
    x = (x / mean).clamp_min(eps)
    return x / x.mean()


# ------------------------------------------------------------------------------------------- pruning


def magnitude_mask(W: Tensor, sparsity: float) -> Tensor:
    """Keep-mask zeroing exactly round(sparsity * numel) smallest-|w| entries; ties go to the lower
    flat index first (stable sort), so the mask is reproducible."""
    _check_2d(W)
    if not 0.0 <= sparsity < 1.0:
        raise PlanError(f"sparsity must be in [0, 1) (got {sparsity})")
    n_prune = round(sparsity * W.numel())
    keep = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
    if n_prune > 0:
        order = torch.argsort(W.detach().abs().reshape(-1), stable=True)
        keep[order[:n_prune]] = False
    return keep.reshape(W.shape)


def mask_2_4(W: Tensor) -> Tensor:
    """2:4 keep-mask: in each group of 4 consecutive weights along the input dim keep the 2 largest |w|
    (ties go to the lower position), the pattern sparse tensor cores accelerate."""
    _check_2d(W)
    out, n_in = W.shape
    if n_in % 4:
        raise PlanError(
            f"2:4 sparsity needs the input dimension divisible by 4 (W has shape {tuple(W.shape)})"
        )
    groups = W.detach().abs().reshape(out, n_in // 4, 4)
    top = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :2]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=W.device)
    keep.scatter_(-1, top, True)
    return keep.reshape(W.shape)


# -------------------------------------------------------------------------------------- quantisation


@dataclass(frozen=True)
class QuantResult:
    """Weight-only quantisation: int8 codes (out, in) in `code_range(bits)` and float32 scales (out, n_groups);
    group_size None means one scale per output row."""

    codes: Tensor
    scales: Tensor
    bits: int
    group_size: int | None


def _group_view(x: Tensor, g: int, n_groups: int) -> Tensor:
    pad = n_groups * g - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], n_groups, g)


def code_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) integer code of a `bits`-bit weight. 8 and 4 bits are symmetric (+-(2^(b-1)-1), zero
    point 2^(b-1) in the kernels); 3 and 2 bits use every level, [-2^(b-1), 2^(b-1)-1] (4 levels at 2 bits, not
    3), with a signed scale: a negative scale puts the wide side of the grid on the positive weights."""
    if bits not in QUANT_BITS:
        raise PlanError(f"integer quantisation supports bits {', '.join(map(str, QUANT_BITS))} (got {bits})")
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if bits in (8, 4) else (-half, half - 1)


def base_scales(wg: Tensor, bits: int) -> Tensor:
    """Scale per group (last axis) that just covers the group's weights on the `bits` grid (before clipping):
    max|w| / qmax symmetric; for the asymmetric 3/2-bit grids the side with the larger magnitude takes the
    -2^(b-1) end (scale sign chosen accordingly). All-zero groups get scale 1."""
    qmin, qmax = code_range(bits)
    amax = wg.abs().amax(dim=-1)
    if qmin == -qmax:
        scale = amax / qmax
    else:
        hi, lo = wg.amax(dim=-1).clamp_min(0.0), (-wg.amin(dim=-1)).clamp_min(0.0)
        neg_wide = lo >= hi  # most extreme weight is negative: codes -2^(b-1)..qmax times a positive scale
        pos = torch.maximum(lo / -qmin, hi / qmax)
        neg = torch.maximum(hi / -qmin, lo / qmax)
        scale = torch.where(neg_wide, pos, -neg)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def round_codes(x: Tensor, bits: int) -> Tensor:
    """round(x) clamped to the `bits` code range (x = w / scale)."""
    qmin, qmax = code_range(bits)
    return torch.round(x).clamp_(qmin, qmax)


def quantize(W: Tensor, bits: int, group_size: int | None, mask: Tensor | None = None,
             col_weight: Tensor | None = None) -> QuantResult:
    """Per-row or per-group quantisation with a max-abs scale refined by a small clipping search (least
    squared error per group; weighted per input column by `col_weight`, e.g. E[x_j^2], when given: the
    activation-aware error); masked-out weights get code 0 and do not influence the scales."""
    _check_2d(W)
    code_range(bits)
    if group_size is not None and group_size < 1:
        raise PlanError(f"group_size must be a positive integer or None (got {group_size})")
    out, n_in = W.shape
    g = n_in if group_size is None else group_size
    n_groups = max(1, math.ceil(n_in / g))

    w = W.detach().to(torch.float32)
    if mask is not None:
        _check_mask(mask, W)
        w = w * mask
    wg = _group_view(w, g, n_groups)  # (out, n_groups, g); padding and masked entries are 0
    cw = None if col_weight is None else _group_view(col_weight.to(w).reshape(1, -1), g, n_groups)
    qmin, qmax = code_range(bits)
    amax = wg.abs().amax(dim=-1)
    nonzero = amax > 0
    base = base_scales(wg, bits)
    best_scale = base
    best_err = torch.full_like(base, float("inf"))
    for ratio in CLIP_RATIOS if qmin == -qmax else CLIP_RATIOS_LOW:
        if qmin == -qmax:  # symmetric: the same float arithmetic as always (stable codes for 8/4 bits)
            scale = torch.where(nonzero, amax * (ratio / qmax), torch.ones_like(amax))
        else:
            scale = torch.where(nonzero, base * ratio, base)
        err = (round_codes(wg / scale[..., None], bits) * scale[..., None] - wg).square_()
        err = (err if cw is None else err * cw).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)

    codes = round_codes(wg / best_scale[..., None], bits)
    codes = codes.reshape(out, n_groups * g)[:, :n_in].to(torch.int8)
    if mask is not None:
        codes = codes * mask.to(torch.int8)
    return QuantResult(codes=codes, scales=best_scale, bits=bits, group_size=group_size)


def dequantize(q: QuantResult) -> Tensor:
    """Float32 W_hat = codes * scale of their group (masked entries stay exactly 0)."""
    n_in = q.codes.shape[1]
    g = n_in if q.group_size is None else q.group_size
    scales = q.scales.repeat_interleave(g, dim=1)[:, :n_in]
    return q.codes.to(torch.float32) * scales


def fake_quant(W: Tensor, bits: int, group_size: int | None, mask: Tensor | None = None) -> Tensor:
    """dequantize(quantize(...)): the float weights the quantised model will effectively use."""
    return dequantize(quantize(W, bits, group_size, mask))


# ------------------------------------------------------------------------------------------- packing


# -- int8 compute kernel (what onnxruntime's DynamicQuantizeMatMul computes) ----------------------------------
INT8_QMAX_ENV = "SLIMFORMER_INT8_WEIGHT_QMAX"
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def int8_weight_qmax() -> int:
    """Largest |code| of the int8 compute kernel's weights on this machine: 127, or 64 on an x86 CPU with AVX2 but
    no VNNI/AMX. There onnxruntime's uint8 x int8 GEMM (vpmaddubsw) adds each pair of products in saturating int16:
    measured on an AMD EPYC Zen 3 (2026-12-02), DynamicQuantizeMatMul equals that saturating sum to 4e-7 and
    differs from the exact product by up to 70% of the output on an input with an outlier channel; with ±64
    weights no pair can exceed 255 * 64 * 2 < 2^15, so the kernel is exact again (onnxruntime's own remedy:
    `reduce_range` on non-VNNI machines). `SLIMFORMER_INT8_WEIGHT_QMAX` (64 or 127) overrides the detection, e.g.
    to export for another CPU than the one at hand. Read once per process."""
    env = os.environ.get(INT8_QMAX_ENV)
    if env:
        if env.strip() not in ("64", "127"):
            raise PlanError(f"{INT8_QMAX_ENV} must be 64 or 127 (got {env!r})")
        return int(env)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return 64 if "avx2" in flags and not any(v in flags for v in _VNNI_FLAGS) else 127


def requantize_rows_int8(w: Tensor, qmax: int | None = None) -> tuple[Tensor, Tensor]:
    """W (N, K) -> (int8 values as float32 (N, K), scale per row (N,)): the requantisation that
    export.kernels.dynamic_int8's folded subgraph applies (scale = max(max|row|, 1e-30) / qmax, round half to
    even; qmax `int8_weight_qmax()` unless given), op for op in float32, so the torch and ONNX weights are equal."""
    w = w.detach().to(torch.float32)
    s8 = torch.clamp(w.abs().amax(dim=1), min=1e-30) / float(qmax or int8_weight_qmax())
    return torch.round(w / s8[:, None]), s8


def dynamic_quantize_uint8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x -> (q - zero_point as float32, scale): onnxruntime's dynamic activation quantisation (uint8, asymmetric,
    one scale for the whole tensor): range [min(0, min x), max(0, max x)], scale = range / 255 (1 when the range
    is 0), zero_point = round(clamp(-min / scale, 0, 255)), q = clamp(round(x / scale) + zero_point, 0, 255)."""
    x = x.to(torch.float32)
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zp = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    q = torch.clamp(torch.round(x / scale) + zp, 0.0, 255.0)
    return q - zp, scale


SMOOTH_ALPHA = 0.8  # SmoothQuant migration strength of `--kernels fast` (a unit's own: UnitSpec.smooth)


def smoothing_factors(act_max: Tensor, w: Tensor, alpha: float = SMOOTH_ALPHA) -> Tensor:
    """SmoothQuant factors s (K,) for y = x W^T: x/s has flatter channels, W*s absorbs the outliers.
    s = max|x_j|^alpha / max|W_:,j|^(1-alpha) (float64), geometric mean 1 (the int8 scales are scale-free);
    `w` holds every weight row that reads x (query/key/value share one set: SmoothQuant's shared-input rule)."""
    a = torch.clamp(act_max.detach().to(torch.float64).reshape(-1), min=1e-5)
    wm = torch.clamp(w.detach().abs().amax(dim=0).to(torch.float64), min=1e-5)
    if a.shape != wm.shape:
        raise PlanError(f"act_max has {a.numel()} features, the weight {wm.numel()} input columns")
    s = a ** alpha / wm ** (1.0 - alpha)
    return (s / torch.exp(torch.log(s).mean())).to(torch.float32)


def int8_linear(x: Tensor, w: Tensor, bias: Tensor | None, smooth: Tensor | None = None) -> Tensor:
    """y = x W^T (+ bias) as the int8 compute kernel runs it: uint8 activations (per tensor) times the int8
    weight (per row), the integer products rescaled by scale_x * scale_row. With SmoothQuant factors `smooth`
    (K,), x * (1/smooth) is quantised and W * smooth requantised (codes within +-int8_weight_qmax()), op for op
    in float32 as export.kernels.dynamic_int8 computes them (Reciprocal, Mul). With gradients on (recovery), the
    rounding is straight-through: the value is the int8 kernel's, the gradient the fp32 linear's."""
    xs, ws = x.detach(), w
    if smooth is not None:
        s = smooth.to(torch.float32)
        xs, ws = xs.to(torch.float32) * torch.reciprocal(s), w.detach().to(torch.float32) * s
    wq, s8 = requantize_rows_int8(ws)  # codes within +-int8_weight_qmax(), as the exporter requantises
    xq, sx = dynamic_quantize_uint8(xs)
    y = torch.nn.functional.linear(xq, wq) * (sx * s8)
    y = y if bias is None else y + bias.detach()
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        exact = torch.nn.functional.linear(x, w, bias)
        return exact + (y - exact).detach()
    return y


def pack_nibbles(vals: Tensor) -> Tensor:
    """Flat values in [0, 15] -> uint8, element 2k in the low nibble and 2k+1 in the high nibble (odd length
    padded with 0). The one 4-bit packer: saved models and ONNX exports store the same bytes."""
    v = vals.reshape(-1).to(torch.int16)
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    pairs = v.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of pack_nibbles: the first n nibbles as int16 values in [0, 15]."""
    p = packed.reshape(-1).to(torch.int16)
    if 2 * p.numel() < n:
        raise PlanError(f"packed buffer holds {2 * p.numel()} 4-bit values, {n} requested")
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]


def pack_int4(codes: Tensor) -> Tensor:
    """Two signed 4-bit codes per byte (two's complement, flattened, odd length padded with 0): halves
    int4 storage compared with int8 codes."""
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise PlanError("int4 codes must lie in [-8, 7]; quantise with bits=4 before packing")
    return pack_nibbles(codes.to(torch.int16) & 0xF)


def unpack_int4(packed: Tensor, numel: int, shape: Sequence[int]) -> Tensor:
    """Inverse of pack_int4: the first numel signed codes as int8, reshaped to shape."""
    if math.prod(shape) != numel:
        raise PlanError(f"shape {tuple(shape)} does not hold numel={numel} codes")
    v = _unpack_nibbles(packed, numel)
    return torch.where(v >= 8, v - 16, v).to(torch.int8).reshape(tuple(shape))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes of any width in QUANT_BITS -> ceil(numel * bits / 8) bytes: 8 bits as int8, 4 bits as two's
    complement nibbles (`pack_int4`), 3 and 2 bits as code + 2^(b-1) in a little-endian bit stream (4 codes per
    byte at 2 bits, 8 per 3 bytes at 3 bits; MatMulNBits' 2-bit layout). Flattened; the last byte zero padded."""
    if bits == 8:
        return codes.reshape(-1).to(torch.int8).contiguous()
    if bits == 4:
        return pack_int4(codes)
    qmin, qmax = code_range(bits)
    if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise PlanError(f"{bits}-bit codes must lie in [{qmin}, {qmax}]; quantise with bits={bits} before packing")
    v = (codes.reshape(-1).to(torch.int32) - qmin)
    per = 8 // math.gcd(8, bits)  # codes per whole number of bytes: 4 (2 bits) or 8 (3 bits)
    pad = (-v.numel()) % per
    if pad:
        v = torch.cat([v, v.new_full((pad,), -qmin)])
    v = v.reshape(-1, per).to(torch.int64)
    word = (v << (bits * torch.arange(per, dtype=torch.int64, device=v.device))).sum(dim=1)  # per*bits <= 24 bits
    n_bytes = per * bits // 8
    out = ((word[:, None] >> (8 * torch.arange(n_bytes, device=v.device))) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: (codes.numel() * bits + 7) // 8]  # exactly ceil(numel * bits / 8) bytes (modules.value_bytes)


def unpack_codes(packed: Tensor, numel: int, bits: int) -> Tensor:
    """Inverse of pack_codes: the first numel codes as a flat int8 tensor."""
    if bits == 8:
        return packed.reshape(-1)[:numel].to(torch.int8)
    if bits == 4:
        return unpack_int4(packed, numel, (numel,))
    qmin, _ = code_range(bits)
    per = 8 // math.gcd(8, bits)
    n_bytes = per * bits // 8
    b = packed.reshape(-1).to(torch.int64)
    if b.numel() * 8 < numel * bits:
        raise PlanError(f"packed buffer of {b.numel()} bytes does not hold {numel} {bits}-bit codes")
    if b.numel() % n_bytes:
        b = torch.cat([b, b.new_zeros(n_bytes - b.numel() % n_bytes)])
    word = (b.reshape(-1, n_bytes) << (8 * torch.arange(n_bytes))).sum(dim=1)
    v = (word[:, None] >> (bits * torch.arange(per))) & ((1 << bits) - 1)
    return (v.reshape(-1)[:numel] + qmin).to(torch.int8)


def pack_bitmask(mask: Tensor) -> Tensor:
    """Eight bool flags per byte (flattened, little-endian bit order, padded with 0) for mask storage."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bitmask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of pack_bitmask: bool mask of the given shape."""
    n = math.prod(shape)
    p = packed.reshape(-1).to(torch.int32)
    if 8 * p.numel() < n:
        raise PlanError(f"packed bitmask holds {8 * p.numel()} flags, shape {tuple(shape)} needs {n}")
    bits = (p[:, None] >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(tuple(shape))


def pack_2_4_indices(mask: Tensor) -> Tensor:
    """Store a 2:4 mask as the two kept positions of each group (2 bits each, 4 bits per group, two
    groups per byte): 1 bit per weight instead of 8."""
    _check_2d(mask, "mask")
    out, n_in = mask.shape
    if n_in % 4:
        raise PlanError(
            f"2:4 mask needs the input dimension divisible by 4 (mask has shape {tuple(mask.shape)})"
        )
    groups = mask.to(torch.bool).reshape(out, n_in // 4, 4)
    if not bool((groups.sum(dim=-1) == 2).all()):
        raise PlanError("not a 2:4 mask: every group of 4 consecutive weights must keep exactly 2")
    kept = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :2]  # ascending positions
    return pack_nibbles(kept[..., 0] | (kept[..., 1] << 2))


def unpack_2_4_indices(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of pack_2_4_indices: bool keep-mask of shape (out, in)."""
    if len(shape) != 2 or shape[1] % 4:
        raise PlanError(f"2:4 mask shape must be (out, in) with in divisible by 4 (got {tuple(shape)})")
    out, n_in = shape
    nib = _unpack_nibbles(packed, out * n_in // 4).to(torch.int64).reshape(out, n_in // 4)
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)
    keep = torch.zeros(out, n_in // 4, 4, dtype=torch.bool, device=packed.device)
    keep.scatter_(-1, idx, True)
    return keep.reshape(out, n_in)


# ------------------------------------------------------------------------------- structured pruning


def head_importance(q_w: list[Tensor] | Tensor, o_w: Tensor, num_heads: int, fused_qkv: bool) -> Tensor:
    """Per-head L2 norm of all its weights: its rows in query/key/value (fused out dim laid out
    [3, heads, head_dim], timm style) together with its columns in the output projection."""
    if num_heads < 1:
        raise PlanError(f"num_heads must be >= 1 (got {num_heads})")
    mats = [q_w] if isinstance(q_w, Tensor) else list(q_w)
    if fused_qkv and len(mats) != 1:
        raise PlanError(f"fused_qkv expects one (3*hidden, in) weight (got {len(mats)} tensors)")
    sq = torch.zeros(num_heads, dtype=torch.float64, device=o_w.device)
    for m in mats:
        _check_2d(m, "query/key/value weight")
        per = 3 * num_heads if fused_qkv else num_heads
        if m.shape[0] % per:
            raise PlanError(f"qkv weight rows {m.shape[0]} are not divisible by {per} ({num_heads} heads)")
        m64 = m.detach().to(device=o_w.device, dtype=torch.float64)
        if fused_qkv:
            sq = sq + m64.reshape(3, num_heads, -1).square().sum(dim=(0, 2))
        else:
            sq = sq + m64.reshape(num_heads, -1).square().sum(dim=1)
    _check_2d(o_w, "attention output weight")
    if o_w.shape[1] % num_heads:
        raise PlanError(f"output weight columns {o_w.shape[1]} are not divisible by {num_heads} heads")
    o64 = o_w.detach().to(torch.float64).reshape(o_w.shape[0], num_heads, -1)
    sq = sq + o64.square().sum(dim=(0, 2))
    return sq.sqrt().to(torch.float32)


def neuron_importance(in_w: Tensor, out_w: Tensor) -> Tensor:
    """FFN neuron score ||row i of ffn_in (inter, hidden)|| * ||column i of ffn_out (hidden, inter)||:
    how much signal can flow through neuron i."""
    _check_2d(in_w, "ffn input weight")
    _check_2d(out_w, "ffn output weight")
    if in_w.shape[0] != out_w.shape[1]:
        raise PlanError(
            f"ffn weights disagree on the inner size: in {tuple(in_w.shape)} vs out {tuple(out_w.shape)}"
        )
    rows = in_w.detach().to(torch.float64).norm(dim=1)
    cols = out_w.detach().to(device=in_w.device, dtype=torch.float64).norm(dim=0)
    return (rows * cols).to(torch.float32)


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices (long) of the k largest scores, ascending so kept heads/neurons keep their order; ties go
    to the lower index."""
    if scores.dim() != 1:
        raise PlanError(f"scores must be 1-D (got shape {tuple(scores.shape)})")
    if not 1 <= k <= scores.numel():
        raise PlanError(f"k must be between 1 and {scores.numel()} (got {k})")
    order = torch.argsort(scores.detach(), descending=True, stable=True)[:k]
    return torch.sort(order).values.to(torch.long)
