"""Make a compressed model trainable without changing its structure, and freeze it back.

Every `SlimLinear` / `SlimEmbedding` (low-rank factors and factorised tables included: they are Slim
modules) gets a torch parametrization on `weight`: the trained tensor is a latent float weight, and the
forward pass sees `fake_quant(latent * mask)`:

* int8/int4: straight-through rounding on the module's own grid (same bits and group size), with the
  per-group scales learned in log space (LSQ-style gradient through the clamp), codes clamped to the width's
  code range (ops.code_range: ±qmax at 8/4 bits, all 2^b levels at 3/2 bits);
* fp16: straight-through fp16 rounding; fp32: the latent itself;
* the pruning mask (bitmask, 2:4 or a sparsity stored dense) multiplies the latent, so pruned weights
  get no gradient and stay exactly zero.

Modules are parametrized in place, once per object, so shared modules stay one object. `freeze_`
removes the parametrizations and re-quantises each latent with the learned scales into the module's
unchanged `WeightFormat` (`set_weight` with explicit codes): what was trained is what is stored, and
the packed bytes equal `plan_memory` exactly as before recovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from slimformer.compression import ops
from slimformer.compression.embedding_tiers import TieredEmbedding
from slimformer.compression.modules import SlimEmbedding, SlimLinear


def _expand(scales: Tensor, group_size: int | None, n_in: int) -> Tensor:
    g = n_in if group_size is None else group_size
    return scales.repeat_interleave(g, dim=1)[:, :n_in]


def _grouped(w: Tensor, scales: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(rows, groups, g) view of `w` (zero-padded when g does not divide the width) and (rows, groups, 1) scales."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    n_groups = scales.shape[1]
    pad = n_groups * g - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, n_groups, g), scales.unsqueeze(-1)


class _STEQuant(torch.autograd.Function):
    """Fake quantisation in one pass: forward round(clamp(w/s)) * s; backward straight through the rounding
    (gradient to w inside the clamp range) and LSQ's gradient to the scales, d/ds = q - (w/s) inside."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, scales: Tensor, qrange: tuple[int, int], group_size: int | None) -> Tensor:
        wg, s = _grouped(w, scales, group_size)
        x = wg / s
        q = x.clamp(*qrange).round_()
        ctx.save_for_backward(w, scales)
        ctx.qrange, ctx.group_size = qrange, group_size
        return (q * s).reshape(w.shape[0], -1)[:, :w.shape[1]]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        w, scales = ctx.saved_tensors
        wg, s = _grouped(w, scales, ctx.group_size)
        gg, _ = _grouped(grad, scales, ctx.group_size)
        x = wg / s
        inside = (x >= ctx.qrange[0]) & (x <= ctx.qrange[1])
        grad_w = (gg * inside).reshape(w.shape[0], -1)[:, :w.shape[1]] if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            q = x.clamp(*ctx.qrange).round_()
            grad_s = (gg * torch.where(inside, q - x, q)).sum(-1)
        return grad_w, grad_s, None, None


class FakeQuant(nn.Module):
    """Parametrization latent -> the weight the deployed module would hold (see module docstring).
    `rows` restricts it to some rows (embedding lookups quantise only the rows a batch uses)."""

    def __init__(self, bits: int, group_size: int | None, mask: Tensor | None, scales: Tensor | None,
                 learn_scales: bool) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))
        self.register_buffer("base_scale", None if scales is None else scales.detach().to(torch.float32).clone())
        self.log_scale = None
        if scales is not None and learn_scales:
            self.log_scale = nn.Parameter(torch.zeros_like(self.base_scale))

    @property
    def qrange(self) -> tuple[int, int]:
        return ops.code_range(self.bits)

    def scales(self, rows: Tensor | None = None) -> Tensor:
        assert self.base_scale is not None
        base = self.base_scale if rows is None else self.base_scale[rows]
        if self.log_scale is None:
            return base
        return base * (self.log_scale if rows is None else self.log_scale[rows]).exp()

    def forward(self, w: Tensor, rows: Tensor | None = None) -> Tensor:
        if self.mask is not None:
            w = w * (self.mask if rows is None else self.mask[rows])
        if self.bits in ops.QUANT_BITS:
            return _STEQuant.apply(w, self.scales(rows), self.qrange, self.group_size)
        if self.bits == 16:
            return w + (w.to(torch.float16).to(w.dtype) - w).detach()
        return w

    @torch.no_grad()
    def codes(self, w: Tensor) -> ops.QuantResult:
        """The integer codes and scales of `w` on this module's grid (what `forward` computes, exactly)."""
        if self.mask is not None:
            w = w * self.mask
        scales = self.scales().detach().clone()
        codes = torch.round((w / _expand(scales, self.group_size, w.shape[1])).clamp(*self.qrange))
        codes = codes.to(torch.int8)
        if self.mask is not None:
            codes = codes * self.mask.to(torch.int8)
        return ops.QuantResult(codes.contiguous(), scales, self.bits, self.group_size)


def _embedding_forward(self: SlimEmbedding, ids: Tensor) -> Tensor:
    """Lookup through the latent table, fake-quantising only the rows this batch uses."""
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    rows = self.recovery_fq(self.recovery_latent[uniq], uniq)
    if self.padding_idx is not None:  # like F.embedding: no gradient into the padding row
        rows = torch.where((uniq == self.padding_idx)[:, None], rows.detach(), rows)
    return rows[inverse].reshape(*ids.shape, rows.shape[-1])


@dataclass
class TrainableModel:
    """The trainable Slim modules of one model (each object once) and the parameters to optimise."""

    modules: list[SlimLinear | SlimEmbedding]
    weights: list[nn.Parameter]  # latent weights and every other parameter of the model
    scales: list[nn.Parameter]  # learned log-scales of the int8/int4 modules


def slim_modules(model: nn.Module) -> list[SlimLinear | SlimEmbedding]:
    """Each SlimLinear / SlimEmbedding object once (shared modules appear once)."""
    seen: set[int] = set()
    out: list[SlimLinear | SlimEmbedding] = []
    for mod in model.modules():
        if isinstance(mod, (SlimLinear, SlimEmbedding)) and id(mod) not in seen:
            seen.add(id(mod))
            out.append(mod)
    return out


def _fake_quant_for(mod: SlimLinear | SlimEmbedding, learn_scales: bool) -> FakeQuant:
    fmt, w = mod.fmt, mod.weight
    mask = mod.mask if mod.mask is not None else getattr(mod, "prune_mask", None)
    scales = None
    if fmt.bits in ops.QUANT_BITS:
        if mod.scales is None:
            raise RuntimeError(f"{type(mod).__name__} in {fmt.bits} bits has no scales; cannot recover it")
        scales = mod.scales.to(w.device)
    return FakeQuant(fmt.bits, fmt.group_size if fmt.bits in ops.QUANT_BITS else None,
                     None if mask is None else mask.to(w.device), scales, learn_scales).to(w.device)


def make_trainable_(model: nn.Module, learn_scales: bool = True) -> TrainableModel:
    """Make every Slim module of `model` trainable in place (see the module docstring): linear weights get
    a parametrization; embedding tables a latent table read row-wise by a replaced forward."""
    mods = slim_modules(model)
    model.requires_grad_(True)
    for m in model.modules():  # a frequency-tiered table stays as stored: its packed tiers are what is saved
        if isinstance(m, TieredEmbedding):
            m.weight.requires_grad_(False)
    fqs: list[FakeQuant] = []
    for mod in mods:
        if parametrize.is_parametrized(mod, "weight") or hasattr(mod, "recovery_fq"):
            raise RuntimeError("model is already being recovered (weights are parametrized)")
        fq = _fake_quant_for(mod, learn_scales)
        fqs.append(fq)
        if isinstance(mod, SlimEmbedding):
            mod.recovery_latent = nn.Parameter(mod.weight.detach().clone())
            mod.recovery_fq = fq
            mod.weight.requires_grad_(False)
            mod.forward = MethodType(_embedding_forward, mod)  # type: ignore[method-assign]
        else:
            parametrize.register_parametrization(mod, "weight", fq)
    scales = [fq.log_scale for fq in fqs if fq.log_scale is not None]
    scale_ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if id(p) not in scale_ids and p.requires_grad]  # shared: once
    return TrainableModel(mods, weights, scales)


@torch.no_grad()
def freeze_(model: nn.Module, state: TrainableModel) -> nn.Module:
    """Undo `make_trainable_` and store each latent as its module's format says (same bits, group, sparse
    layout, mask), using the learned scales; returns `model` in eval mode, gradients off."""
    for mod in state.modules:
        if isinstance(mod, SlimEmbedding):
            fq: FakeQuant = mod.recovery_fq
            latent = mod.recovery_latent.detach().clone()
            del mod.recovery_latent, mod.recovery_fq
            del mod.__dict__["forward"]
        else:
            fq = mod.parametrizations.weight[0]  # type: ignore[union-attr,index,assignment]
            latent = mod.parametrizations.weight.original.detach().clone()  # type: ignore[union-attr]
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        quant = fq.codes(latent) if fq.bits in ops.QUANT_BITS else None
        mask = None if fq.mask is None else fq.mask.clone()
        mod.set_weight(latent, mask, mod.fmt, quant=quant)  # a dense-stored sparsity keeps prune_mask only
    model.requires_grad_(False)
    return model.eval()
