"""AWQ-style activation-aware per-input-channel scaling (Lin et al., 2024), measured against GPTQ (issue 15).

W x = (W diag(s)) (x / s): input channels with large activations are scaled up before rounding, so their
weights get relatively finer steps, and x / s undoes it. s = rms(x)^alpha (normalised to geometric mean 1),
alpha searched on a grid for the smallest calibration output error tr(D H D^T) (D = W - W_hat); alpha 0 is
plain rounding, so the search never does worse than it on the calibration data.

Deployed, the 1/s must be folded into the op that produces x, or the bytes change. In a BERT/MiniLM block
that fold is exact for one projection only (the attention output: the context is softmax(QK^T) V, linear in
V's output channels, so V's rows and bias can absorb 1/s) and for the up factor of a low-rank unit (into the
down factor's rows). Query/key/value and the FFN input read a LayerNorm output that also feeds the residual,
and the FFN output reads GELU(.), which is not homogeneous. This module therefore returns the quantised
W diag(s) and s; `effective_weight` gives what the unit would compute with 1/s folded away for free, the upper
bound that benchmarks/rounding.py measures against GPTQ. It is not a plan `method` (docs/BENCHMARKS.md, rounding
section: even as that upper bound it loses to GPTQ on round-to-nearest and on top of GPTQ it is within 0.003 of
`recon`, which changes no bytes, so the fold was not built).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.compression import ops
from slimformer.compression.gptq import gptq_quantize, output_error

ALPHAS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def channel_scale(H: Tensor, alpha: float) -> Tensor:
    """s_j = rms(x_j)^alpha from the Hessian's diagonal (sum of x_j^2), geometric mean 1; dead channels get 1."""
    d = torch.diag(H.detach()).to(torch.float64).clamp_min(0).sqrt()
    alive = d > 0
    s = torch.ones_like(d)
    if bool(alive.any()):
        s[alive] = d[alive] ** alpha
        s[alive] = s[alive] / torch.exp(torch.log(s[alive]).mean())
    return s.to(torch.float32)


def effective_weight(q: ops.QuantResult, s: Tensor) -> Tensor:
    """The weight a unit computes with: dequantised W diag(s) times diag(1/s)."""
    return ops.dequantize(q) / s.to(q.scales.device)[None, :]


def awq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int | None, mask: Tensor | None = None,
                 gptq: bool = False, alphas: tuple[float, ...] = ALPHAS) -> tuple[ops.QuantResult, Tensor]:
    """(codes/scales of W diag(s), s) for the alpha with the smallest calibration output error; `gptq` rounds
    W diag(s) by GPTQ with the matching Hessian diag(1/s) H diag(1/s) instead of round-to-nearest."""
    w = W.detach().to(torch.float32) if mask is None else W.detach().to(torch.float32) * mask
    best: tuple[ops.QuantResult, Tensor] | None = None
    best_err = float("inf")
    for a in alphas:
        s = channel_scale(H, a).to(w.device)
        ws = w * s[None, :]
        if gptq:
            hs = H / s[:, None] / s[None, :]
            q = gptq_quantize(ws, hs, bits, group_size, mask)
        else:
            q = ops.quantize(ws, bits, group_size, mask)
        err = output_error(w, effective_weight(q, s), H)
        if err < best_err:
            best, best_err = (q, s), err
    assert best is not None
    return best
