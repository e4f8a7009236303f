"""Calibration statistics of the reference model's linear-layer inputs, from a few real batches.

- activation scales (mean |x| per input feature): the activation-weighted SVD for low rank;
- Hessians H = sum x x^T (input dim squared): GPTQ rounding;
- max |x| per input feature: SmoothQuant factors of `kernel: int8` units (compression/smoothing.py; the statistic
  `--kernels fast` takes at export, export.onnx_export.input_abs_max);
- input moments (mean and E[x x^T]) of the projections that read heads / FFN neurons: data-driven
  structured pruning and the least-squares re-fit (compression/structure.py).
Padding positions (attention_mask == 0) are left out: their activations never reach the output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimformer.compression import ops
from slimformer.models.base import Batch, ModelAdapter


def _run_hooks(adapter: ModelAdapter, batches: Sequence[Batch],
               observe: Callable[[str, Tensor], None], units: Collection[str] | None = None) -> None:
    """Run the reference model on batches, calling observe(unit, rows of real-token inputs) per linear unit
    (only the named ones when `units` is given)."""
    current: dict[str, Tensor | None] = {"mask": None}
    hooks = []
    for u in adapter.units:
        if u.kind != "linear" or (units is not None and u.name not in units):
            continue
        mod = adapter.model.get_submodule(u.name)

        def hook(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor, name: str = u.name) -> None:
            x = args[0].detach()
            m = current["mask"]
            if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
                x = x[m.bool()]
            observe(name, x.reshape(-1, x.shape[-1]))

        hooks.append(mod.register_forward_hook(hook))
    device = next(adapter.model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                b = b.to(device)
                current["mask"] = b.inputs.get("attention_mask")
                adapter.output(adapter.model, b)
    finally:
        for h in hooks:
            h.remove()


def collect_activation_scales(adapter: ModelAdapter, batches: Sequence[Batch]) -> dict[str, Tensor]:
    """Mean |input activation| per input feature of every linear unit (normalised to mean 1)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: Tensor) -> None:
        sums[name] = sums.get(name, 0) + x.abs().to(torch.float64).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    _run_hooks(adapter, batches, observe)
    return {k: ops.activation_scale((sums[k] / counts[k]).to(torch.float32)) for k in sums}


def collect_input_abs_max(adapter: ModelAdapter, batches: Sequence[Batch],
                          units: Collection[str] | None = None) -> dict[str, Tensor]:
    """max |input| per input feature of every linear unit (or the named ones), float32 (in,), over real tokens."""
    out: dict[str, Tensor] = {}

    def observe(name: str, x: Tensor) -> None:
        m = x.abs().amax(0).to(torch.float32).cpu() if x.shape[0] else torch.zeros(x.shape[-1])
        out[name] = torch.maximum(out[name], m) if name in out else m

    _run_hooks(adapter, batches, observe, units)
    return out


def collect_hessians(adapter: ModelAdapter, batches: Sequence[Batch]) -> dict[str, Tensor]:
    """Mean x x^T of every linear unit's input (float32, in x in), for GPTQ."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: Tensor) -> None:
        x = x.to(torch.float64)
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    _run_hooks(adapter, batches, observe)
    return {k: (sums[k] / max(counts[k], 1)).to(torch.float32) for k in sums}


@dataclass(frozen=True)
class InputMoments:
    """First and second moments of one linear unit's input over real tokens: mean (in,), E[x x^T] (in, in)."""

    mean: Tensor
    second: Tensor
    count: int

    @property
    def covariance(self) -> Tensor:
        """E[(x - mean)(x - mean)^T] in float64."""
        m = self.mean.to(torch.float64)
        return self.second.to(torch.float64) - m[:, None] * m[None, :]


@dataclass(frozen=True)
class StructureStats:
    """Input moments of the projections that read attention heads and FFN neurons, and a fingerprint of
    them (cache keys: the same calibration data gives the same kept sets and re-fitted weights)."""

    moments: dict[str, InputMoments]
    fingerprint: str


def structure_units(adapter: ModelAdapter) -> list[str]:
    """The units whose inputs are heads (attention output) or FFN neurons (FFN output), per layer."""
    return [n for info in adapter.layers for n in (info.attn_out_unit, info.ffn_out_unit)]


def collect_structure_stats(adapter: ModelAdapter, batches: Sequence[Batch]) -> StructureStats:
    """Mean and E[x x^T] (float64 sums, stored float32) of every attention-output / FFN-output input."""
    sums: dict[str, Tensor] = {}
    sq: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: Tensor) -> None:
        x = x.to(torch.float64)
        sums[name] = sums.get(name, 0) + x.sum(0)
        sq[name] = sq.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    _run_hooks(adapter, batches, observe, set(structure_units(adapter)))
    moments = {k: InputMoments((sums[k] / max(counts[k], 1)).to(torch.float32).cpu(),
                               (sq[k] / max(counts[k], 1)).to(torch.float32).cpu(), counts[k]) for k in sums}
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(moments):
        h.update(k.encode())
        h.update(moments[k].mean.numpy().tobytes())
        h.update(moments[k].second.numpy().tobytes())
    return StructureStats(moments, h.hexdigest())
