"""GPTQ-style error-compensating rounding (Frantar et al., 2023) for weight-only int8/int4.

Same storage as round-to-nearest (symmetric codes, one fp32 scale per row or per group along the
input dimension), but each column's rounding error is pushed onto the columns not yet quantised,
weighted by the inverse Hessian H = E[x x^T] of the layer's inputs from calibration data. On
all-MiniLM-L6-v2 int4 g128 everywhere goes from 0.943 to 0.972 embedding cosine (docs/BENCHMARKS.md).
Masked (pruned) weights are forced to code 0 and their error is compensated like any other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimformer.compression import ops
from slimformer.errors import PlanError


def inverse_hessian(H: Tensor, damp: float = 0.01) -> Tensor | None:
    """Upper Cholesky factor of the damped inverse Hessian (None if not positive definite); cacheable."""
    h = H.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    except RuntimeError:
        return None


def gptq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int | None, mask: Tensor | None = None,
                  damp: float = 0.01, block: int = 128, hinv: Tensor | None = None) -> ops.QuantResult:
    """Quantise W (out, in) with GPTQ given the input Hessian H (in, in); returns codes and scales.

    Group scales are chosen (with the same clipping search as round-to-nearest) when the sweep reaches
    the group, from the already error-updated weights, as in the reference implementation.
    """
    if bits not in (8, 4):
        raise PlanError(f"GPTQ supports bits 8 or 4 (got {bits})")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise PlanError(f"GPTQ Hessian has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
    device = W.device
    w = W.detach().to(torch.float32).clone()
    if mask is not None:
        w = w * mask
    w[:, torch.diag(H) == 0] = 0.0
    if hinv is None:
        hinv = inverse_hessian(H.to(device), damp)
    if hinv is None:  # not positive definite even after damping: fall back to plain rounding
        return ops.quantize(W, bits, group_size, mask)
    g = in_f if group_size is None else group_size
    n_groups = max(1, math.ceil(in_f / g))
    qmax = float(2 ** (bits - 1) - 1)
    scales = torch.ones(out_f, n_groups, dtype=torch.float32, device=device)
    codes = torch.zeros(out_f, in_f, dtype=torch.int8, device=device)
    keep = None if mask is None else mask.to(torch.float32)
    if group_size is None:
        scales[:, 0] = ops.quantize(w, bits, None, mask).scales[:, 0]
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None and col % g == 0:
                gw = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : min(g, in_f - col)]
                gm = None if mask is None else mask[:, col: col + gw.shape[1]]
                scales[:, col // g] = ops.quantize(gw, bits, None, gm).scales[:, 0]
            s = scales[:, col // g]
            c = torch.round(w1[:, i] / s).clamp_(-qmax, qmax)
            if keep is not None:
                c = c * keep[:, col]
            codes[:, col] = c.to(torch.int8)
            e = (w1[:, i] - c * s) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return ops.QuantResult(codes=codes, scales=scales, bits=bits, group_size=group_size)
