"""Distillation losses between a teacher and a compressed student, and the forward hooks that feed them.

  cosine     1 - cos(student output, teacher output) (pooled sentence embedding / logits)
  mse        ||s - t||^2 / ||t||^2 on the outputs (relative, so weights are comparable)
  kl         T^2 KL(softmax(t/T) || softmax(s/T)) on logits (classifiers, ViT)
  hidden     per-block output MSE relative to the teacher's mean square, averaged over blocks (padding
             tokens excluded). Compression keeps the hidden width, so no projection is needed.
  relations  MiniLM-v2 self-attention relation distillation on the last block: Q-Q, K-K and V-V scaled
             dot-product relations split into R relation heads (R divides both widths, so a student with
             pruned heads is comparable), KL(teacher || student) over keys, averaged over valid queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimformer.models.base import Batch, ModelAdapter


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Taps:
    """Outputs captured by forward hooks during one forward pass, in call order.

    `blocks` holds each Transformer block's output (a block called twice under sharing appears twice, in
    order, so index i is always layer i). `qkv` holds the last call of the last block's q/k/v modules.
    """

    blocks: list[Tensor] = field(default_factory=list)
    qkv: dict[str, Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.blocks.clear()
        self.qkv.clear()

    def projections(self) -> tuple[Tensor, Tensor, Tensor]:
        """The last block's query, key and value outputs (split when the model fuses them in one linear)."""
        if "qkv" in self.qkv:
            return tuple(self.qkv["qkv"].chunk(3, dim=-1))  # type: ignore[return-value]
        return self.qkv["q"], self.qkv["k"], self.qkv["v"]

    def detached(self) -> Taps:
        """A copy holding detached tensors (a teacher's taps, kept across steps)."""
        return Taps([b.detach() for b in self.blocks], {k: v.detach() for k, v in self.qkv.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.blocks, *self.qkv.values()))


class Tapper:
    """Registers the hooks a set of losses needs on one model; `close()` removes them."""

    def __init__(self, adapter: ModelAdapter, model: nn.Module, hidden: bool, relations: bool) -> None:
        self.taps = Taps()
        self._handles: list[Any] = []
        if hidden:
            hooked: set[int] = set()
            for info in adapter.layers:
                mod = model.get_submodule(info.path)
                if id(mod) not in hooked:  # a shared block is one object: hook it once
                    hooked.add(id(mod))
                    self._handles.append(mod.register_forward_hook(self._block))
        if relations:
            last = adapter.layers[-1]
            names = ("qkv",) if len(last.qkv_units) == 1 else ("q", "k", "v")
            for key, path in zip(names, last.qkv_units):
                self._handles.append(model.get_submodule(path).register_forward_hook(self._proj(key)))

    def _block(self, _m: nn.Module, _args: Any, out: Any) -> None:
        self.taps.blocks.append(_first(out))

    def _proj(self, key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            self.taps.qkv[key] = _first(out)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def token_mask(batch: Batch, n_tokens: int, device: torch.device) -> Tensor | None:
    """(B, L) bool of real tokens for text batches; None for images (every patch token counts)."""
    m = batch.inputs.get("attention_mask")
    if m is None or m.shape[-1] != n_tokens:
        return None
    return m.to(device).bool()


def relative_mse(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over (valid) rows, relative to the teacher's mean square."""
    if mask is not None:
        s, t = s[mask], t[mask]
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


def relation_heads(width_t: int, width_s: int, preferred: int) -> int:
    """The largest R <= `preferred` that divides both widths (MiniLM-v2 relation heads)."""
    g = math.gcd(width_t, width_s)
    return max(r for r in range(1, preferred + 1) if g % r == 0)


def relation_kl(s: Tensor, t: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """KL(teacher || student) of softmax(X X^T / sqrt(d)) per relation head, over valid keys and queries."""
    def log_rel(x: Tensor) -> Tensor:
        b, n, w = x.shape
        d = w // heads
        xh = x.reshape(b, n, heads, d).transpose(1, 2)  # (B, R, L, d)
        logits = xh @ xh.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        return F.log_softmax(logits, dim=-1)

    lt, ls = log_rel(t), log_rel(s)
    kl = (lt.exp() * (lt - ls)).sum(-1)  # (B, R, L)
    if mask is None:
        return kl.mean()
    q = mask[:, None, :].expand_as(kl)
    return kl[q].mean()


def distill_loss(weights: dict[str, float], temperature: float, relation_pref: int, batch: Batch,
                 s_out: Tensor, t_out: Tensor, s_taps: Taps | None, t_taps: Taps | None
                 ) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the chosen losses and each term's value (for the log)."""
    terms: dict[str, Tensor] = {}
    s_out, t_out = s_out.float(), t_out.float()
    if "cosine" in weights:
        terms["cosine"] = (1 - F.cosine_similarity(s_out, t_out, dim=-1)).mean()
    if "mse" in weights:
        terms["mse"] = relative_mse(s_out, t_out)
    if "kl" in weights:
        tt = temperature
        terms["kl"] = F.kl_div(F.log_softmax(s_out / tt, -1), F.log_softmax(t_out / tt, -1), log_target=True,
                               reduction="batchmean") * tt * tt
    if "hidden" in weights and s_taps is not None and t_taps is not None:
        sb, tb = s_taps.blocks, t_taps.blocks
        mask = token_mask(batch, tb[0].shape[1], tb[0].device)
        terms["hidden"] = torch.stack([relative_mse(s, t, mask) for s, t in zip(sb, tb)]).mean()
    if "relations" in weights and s_taps is not None and t_taps is not None:
        sq, tq = s_taps.projections(), t_taps.projections()
        mask = token_mask(batch, tq[0].shape[1], tq[0].device)
        heads = relation_heads(tq[0].shape[-1], sq[0].shape[-1], relation_pref)
        terms["relations"] = torch.stack([relation_kl(s, t, heads, mask) for s, t in zip(sq, tq)]).mean()
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}  # type: ignore[return-value]
