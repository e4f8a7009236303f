"""Compressed modules. Each holds the effective fp32 weight used in forward (so torch runs it as is)
plus the deployable form (integer codes, scales, sparsity mask) that packing and ONNX export read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimformer.compression import ops

SparseFormat = Literal["dense", "bitmask", "2:4"]


@dataclass(frozen=True)
class WeightFormat:
    """How one stored matrix is laid out: value bits, quantisation group, sparse format."""

    bits: int = 32
    group_size: int | None = None
    sparse: SparseFormat = "dense"


def value_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def sparse_format(numel: int, nnz: int, bits: int, pattern: str) -> SparseFormat:
    """Pick the stored layout: 2:4 as such; a bitmask only when it is smaller than dense storage."""
    if pattern == "2:4":
        return "2:4"
    if nnz < numel and value_bytes(nnz, bits) + (numel + 7) // 8 < value_bytes(numel, bits):
        return "bitmask"
    return "dense"


def matrix_bytes(shape: tuple[int, int], fmt: WeightFormat, nnz: int) -> int:
    """Exact bytes of one stored matrix in `fmt` with `nnz` kept weights (scales fp32)."""
    rows, cols = shape
    n = rows * cols
    if fmt.sparse == "2:4":
        total = value_bytes(n // 2, fmt.bits) + (n // 4 + 1) // 2
    elif fmt.sparse == "bitmask":
        total = value_bytes(nnz, fmt.bits) + (n + 7) // 8
    else:
        total = value_bytes(n, fmt.bits)
    if fmt.bits in ops.QUANT_BITS:
        groups = 1 if fmt.group_size is None else -(-cols // fmt.group_size)
        total += rows * groups * 4
    return total


class _Stored:
    """Mixin: the deployable form of `self.weight` (codes/scales/mask buffers) and its packing."""

    fmt: WeightFormat
    weight: Tensor

    def _init_store(self, fmt: WeightFormat) -> None:
        self.fmt = fmt
        self.register_buffer("codes", None)  # type: ignore[attr-defined]
        self.register_buffer("scales", None)  # type: ignore[attr-defined]
        self.register_buffer("mask", None)  # type: ignore[attr-defined]
        self.prune_mask: Tensor | None = None

    def set_weight(self, w: Tensor, mask: Tensor | None, fmt: WeightFormat, quant: ops.QuantResult | None = None
                   ) -> None:
        """Quantise / round `w` as `fmt` says (masked weights stay zero) and store both forms;
        `quant` supplies codes and scales computed elsewhere (e.g. GPTQ)."""
        self.fmt = fmt
        self.mask = None if fmt.sparse == "dense" or mask is None else mask.clone()
        # the pruning mask even when sparsity is stored dense (below break-even): recovery keeps these zeros
        self.prune_mask = None if mask is None else mask.clone()
        w = w if mask is None else w * mask
        if fmt.bits in ops.QUANT_BITS:
            q = quant if quant is not None else ops.quantize(w, fmt.bits, fmt.group_size, mask=mask)
            self.codes, self.scales = q.codes, q.scales
            eff = ops.dequantize(q)
        elif fmt.bits == 16:
            self.codes = self.scales = None
            eff = w.to(torch.float16).to(torch.float32)
        else:
            self.codes = self.scales = None
            eff = w.clone()
        with torch.no_grad():
            self.weight = nn.Parameter(eff.contiguous(), requires_grad=self.weight.requires_grad)

    def nnz(self) -> int:
        return int(self.weight.numel() if self.mask is None else self.mask.sum())

    def stored_bytes(self) -> int:
        return matrix_bytes(tuple(self.weight.shape), self.fmt, self.nnz())  # type: ignore[arg-type]

    def pack(self, prefix: str) -> dict[str, Tensor]:
        """The deployable tensors of this matrix, as written to model.safetensors."""
        w = self.weight.detach()
        flat_mask = None if self.mask is None else self.mask.reshape(-1)
        out: dict[str, Tensor] = {}
        if self.fmt.sparse == "bitmask":
            out[f"{prefix}.mask"] = ops.pack_bitmask(self.mask)
        elif self.fmt.sparse == "2:4":
            out[f"{prefix}.idx24"] = ops.pack_2_4_indices(self.mask)
        if self.fmt.bits in ops.QUANT_BITS:
            codes = self.codes.reshape(-1)
            if flat_mask is not None:
                codes = codes[flat_mask]
            out[f"{prefix}.codes"] = ops.pack_codes(codes, self.fmt.bits)
            out[f"{prefix}.scales"] = self.scales.contiguous()
        else:
            vals = w.reshape(-1) if flat_mask is None else w.reshape(-1)[flat_mask]
            dtype = torch.float16 if self.fmt.bits == 16 else torch.float32
            out[f"{prefix}.values"] = vals.to(dtype).contiguous()
        return out

    def unpack(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """Inverse of `pack`: rebuild codes, scales, mask and the effective weight."""
        shape = tuple(self.weight.shape)
        numel = shape[0] * shape[1]
        mask = None
        if self.fmt.sparse == "bitmask":
            mask = ops.unpack_bitmask(tensors[f"{prefix}.mask"], shape)
        elif self.fmt.sparse == "2:4":
            mask = ops.unpack_2_4_indices(tensors[f"{prefix}.idx24"], shape)
        count = numel if mask is None else int(mask.sum())
        if self.fmt.bits in ops.QUANT_BITS:
            raw = tensors[f"{prefix}.codes"]
            vals = ops.unpack_codes(raw, count, self.fmt.bits)
            codes = torch.zeros(numel, dtype=torch.int8)
            if mask is None:
                codes = vals.reshape(-1).to(torch.int8)
            else:
                codes[mask.reshape(-1)] = vals.reshape(-1).to(torch.int8)
            self.codes = codes.reshape(shape)
            self.scales = tensors[f"{prefix}.scales"].to(torch.float32)
            eff = ops.dequantize(ops.QuantResult(self.codes, self.scales, self.fmt.bits, self.fmt.group_size))
        else:
            flat = torch.zeros(numel, dtype=torch.float32)
            vals = tensors[f"{prefix}.values"].to(torch.float32)
            if mask is None:
                flat = vals.reshape(-1).clone()
            else:
                flat[mask.reshape(-1)] = vals
            eff = flat.reshape(shape)
        self.mask = mask
        self.prune_mask = mask  # a sparsity stored dense is not in the file; its zeros are plain values here
        with torch.no_grad():
            self.weight = nn.Parameter(eff.contiguous(), requires_grad=False)


class SlimLinear(nn.Linear, _Stored):
    """nn.Linear whose weight has a deployable format (bits, group, sparsity) and a compute kernel.

    kernel "exact": y = x W^T + b in fp32 (the weight-only kernels the exporter emits compute this exactly);
    "int8": the int8 GEMM the exporter emits for it (`ops.int8_linear`: weight requantised to int8 per row,
    activations to uint8 per tensor), so the search scores the numerics the deployed model runs.
    `smooth` (K,) fp32 or None: the unit's SmoothQuant factors (int8 kernel only; set from calibration data
    when the plan is applied, compression/smoothing.py): x / smooth is quantised, W * smooth requantised. The
    stored weight stays W, so the exact kernel (and export's `kernels exact`) ignore them; they are packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 fmt: WeightFormat | None = None, kernel: str = "exact") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_store(fmt or WeightFormat())
        self.kernel = kernel
        self.register_buffer("smooth", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "int8":
            return ops.int8_linear(x, self.weight, self.bias, self.smooth)
        return super().forward(x)

    def pack(self, prefix: str) -> dict[str, Tensor]:
        out = super().pack(prefix)
        if self.smooth is not None:
            out[f"{prefix}.smooth"] = self.smooth.detach().to(torch.float32).contiguous()
        return out

    def unpack(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        super().unpack(prefix, tensors)
        if self.smooth is not None:  # the plan says smoothed (a placeholder was set when it was applied)
            self.smooth = tensors[f"{prefix}.smooth"].to(torch.float32).clone()

    def extra_repr(self) -> str:
        kern = "" if self.kernel == "exact" else f", kernel={self.kernel}"
        smooth = "" if self.smooth is None else ", smoothed"
        return f"{super().extra_repr()}, fmt={self.fmt}{kern}{smooth}"


class SlimEmbedding(nn.Embedding, _Stored):
    """nn.Embedding whose table has a deployable format; a group runs along the embedding dim."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 fmt: WeightFormat | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self._init_store(fmt or WeightFormat())


class LowRankLinear(nn.Module):
    """W ~ up @ down: x -> down (in->rank, no bias) -> up (rank->out, with the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = SlimLinear(in_features, rank, bias=False)
        self.up = SlimLinear(rank, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias


class FactorizedEmbedding(nn.Module):
    """ALBERT-style table: tokens -> rank-dim rows (`table`) -> `proj` (rank -> dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None
                 ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.table = SlimEmbedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = SlimLinear(rank, embedding_dim, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(self.table(ids), self.proj.weight)


@contextmanager
def exact_compute(model: nn.Module) -> Iterator[nn.Module]:
    """Every SlimLinear computes in fp32 (kernel "exact") inside the block, its own kernel again after it: the
    ONNX exporter traces plain MatMuls (it lowers each unit's kernel itself) and gathers fp32 statistics."""
    saved = [(m, m.kernel) for m in model.modules() if isinstance(m, SlimLinear)]
    try:
        for m, _ in saved:
            m.kernel = "exact"
        yield model
    finally:
        for m, k in saved:
            m.kernel = k
