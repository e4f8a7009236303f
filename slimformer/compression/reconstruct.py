"""Method "recon": output reconstruction of a unit's scales on calibration data, codes from GPTQ (act-order +
damping search).

With the integer codes C fixed, a unit's calibration output error tr((W - W_hat) H (W - W_hat)^T), H = sum x x^T
of its inputs, is quadratic in the scales: row r's W_hat_r = sum_a s_ra c_r,a (c_r,a the row's codes in group
a, zero elsewhere), so the best scales solve one small G x G system per row,
(c_r,a^T H c_r,b)_ab s_r = (c_r,a^T H w_r)_a. That is the optimum that OmniQuant / AdaRound-style gradient steps on
the scales approach, found in closed form per unit (no learning rate or step count). The codes are then
re-rounded by GPTQ with the new scales held fixed and the scales re-solved (`rounds` times); the best result by
output error is kept, so "recon" never does worse than its GPTQ start on the calibration data. Storage is
unchanged: the same codes and one fp32 scale per group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimformer.compression import ops
from slimformer.compression.gptq import gptq_quantize, gptq_search, output_error

RIDGE = 1e-6  # relative to the mean diagonal of each row's system: keeps empty/degenerate groups solvable


def refit_scales(W: Tensor, q: ops.QuantResult, H: Tensor) -> ops.QuantResult:
    """The scales that minimise the calibration output error of W for q's codes (see module docstring); a group
    whose codes are all zero keeps its scale (it does not affect the output)."""
    w = W.detach().to(torch.float64)
    h = H.detach().to(torch.float64)
    c = q.codes.to(torch.float64)
    out_f, in_f = c.shape
    g = in_f if q.group_size is None else q.group_size
    n_groups = max(1, math.ceil(in_f / g))
    gid = torch.arange(in_f, device=c.device) // g
    onehot = torch.nn.functional.one_hot(gid, n_groups).to(torch.float64)  # (K, G)
    rhs = (c * (w @ h)) @ onehot  # (N, G): c_r,a . (H w_r)_a
    system = torch.empty(out_f, n_groups, n_groups, dtype=torch.float64, device=c.device)
    for a in range(n_groups):
        lo, hi = a * g, min((a + 1) * g, in_f)
        pa = c[:, lo:hi] @ h[lo:hi]  # (N, K): c_r,a^T H restricted to rows of group a
        system[:, a] = (pa * c) @ onehot
    diag = torch.diagonal(system, dim1=1, dim2=2)
    empty = diag <= 0
    scale = diag.clamp_min(0).mean(dim=1, keepdim=True).clamp_min(1e-30)
    system = system + torch.diag_embed(torch.where(empty, torch.ones_like(diag), RIDGE * scale.expand_as(diag)))
    rhs = torch.where(empty, q.scales.to(torch.float64), rhs)
    sol = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    new = torch.where(empty, q.scales.to(torch.float64), sol)
    new = torch.where(torch.isfinite(new) & (new != 0), new, q.scales.to(torch.float64))
    return ops.QuantResult(q.codes, new.to(torch.float32), q.bits, q.group_size)


def reconstruct(W: Tensor, H: Tensor, bits: int, group_size: int | None, mask: Tensor | None = None,
                hinv: Tensor | None = None, rounds: int = 2) -> ops.QuantResult:
    """Method "recon": gptq-ao codes, least-squares scales, then `rounds` - 1 times GPTQ with those scales fixed
    and the scales re-solved; the result with the smallest calibration output error."""
    ref = W.detach().to(torch.float32) if mask is None else W.detach().to(torch.float32) * mask
    q = gptq_search(W, H, bits, group_size, mask, hinv=hinv)
    best, best_err = q, output_error(ref, ops.dequantize(q), H)
    for r in range(rounds):
        if r:
            q = gptq_quantize(W, H, bits, group_size, mask, act_order=True, scales=q.scales)
        q = refit_scales(ref, q, H)
        err = output_error(ref, ops.dequantize(q), H)
        if err < best_err:
            best, best_err = q, err
    return best
