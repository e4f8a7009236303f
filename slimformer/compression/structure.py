"""Data-driven structured pruning: which heads / FFN neurons to keep, and the least-squares re-fit of the
projection that reads them (after Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers", with a diagonal importance and a closed-form ridge fit instead of their mask search).

Both use only the input moments of the following projection P (attention output for heads, FFN output for
neurons) on calibration tokens of the reference model: mean m and second moment S = E[x x^T]
(compression/calibration.py `collect_structure_stats`).

- Importance of an input group g (one head's head_dim columns, or one neuron): the expected squared
  contribution of that group to P's output, E||W[:, g] (x_g - c_g)||^2 = trace(W_g^T W_g S_gg) with c = m
  when the bias is re-fitted (the mean of a removed group is absorbed by the bias, so only its variance is
  lost) and c = 0 otherwise. For a neuron this is ||W[:, j]||^2 * E[h_j^2] (or Var[h_j]).
- Re-fit (kept columns k, covariance C, full weight W, bias b):
      W' = argmin E||(x_k - m_k) W'^T - (x - m) W^T||^2 + lam ||W' - W[:, k]||^2
         = (W C[:, k] + lam W[:, k]) (C[k, k] + lam I)^-1,      lam = damp * mean(diag C[k, k]),
      b' = b + W m - W' m_k,
  i.e. ridge least squares with an intercept, shrunk towards the plain column selection (not towards 0, which
  would bias every kept weight down); the bias takes the mean of what was removed. Without a bias the fit is
  uncentred (C = S, no intercept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.compression.calibration import InputMoments
from slimformer.errors import PlanError

# Ridge lambda relative to the mean diagonal of the kept inputs' covariance. Measured on MiniLM (held-out cosine,
# every layer, 64 / 256 calibration texts): 0.01 over-fits 64 texts (50% of the heads: 0.834, and 0.790 on a
# second text domain), 0.1 gives 0.860 / 0.822 there and is within 0.004 of the best of {0.01, 0.1, 1, 10} on
# every cut with 256 texts; 1 and above under-fit the FFN (50% of neurons, 256 texts: 0.882 vs 0.902).
REFIT_DAMP = 0.1


def _moment(mom: InputMoments, centered: bool) -> Tensor:
    return mom.covariance if centered else mom.second.to(torch.float64)


def group_contribution(w: Tensor, mom: InputMoments, group: int, centered: bool) -> Tensor:
    """Expected squared contribution to W x of each consecutive block of `group` input columns (float32)."""
    if w.dim() != 2 or mom.second.shape != (w.shape[1], w.shape[1]):
        raise PlanError(f"input moments {tuple(mom.second.shape)} do not match weight {tuple(w.shape)}")
    if group < 1 or w.shape[1] % group:
        raise PlanError(f"{w.shape[1]} input columns are not divisible into groups of {group}")
    s = _moment(mom, centered).to(w.device)
    w64 = w.detach().to(torch.float64)
    n = w.shape[1] // group
    if group == 1:
        return (w64.square().sum(0) * torch.diagonal(s)).clamp_min(0).to(torch.float32)
    g = (w64.T @ w64) * s  # sum over j, l of a block of (W^T W)_jl S_jl = trace(W_g^T W_g S_gg)
    blocks = g.reshape(n, group, n, group)
    return torch.diagonal(blocks, dim1=0, dim2=2).sum(dim=(0, 1)).clamp_min(0).to(torch.float32)


def neuron_scores(w_out: Tensor, mom: InputMoments, centered: bool) -> Tensor:
    """FFN neuron j: ||W_out[:, j]||^2 * E[h_j^2] (Var[h_j] when centred)."""
    return group_contribution(w_out, mom, 1, centered)


def head_scores(w_out: Tensor, mom: InputMoments, num_heads: int, centered: bool) -> Tensor:
    """Attention head h: E||W_out[:, cols of h] ctx_h||^2 (ctx_h centred when `centered`)."""
    if num_heads < 1 or w_out.shape[1] % num_heads:
        raise PlanError(f"attention output width {w_out.shape[1]} is not divisible by {num_heads} heads")
    return group_contribution(w_out, mom, w_out.shape[1] // num_heads, centered)


def refit_projection(w: Tensor, bias: Tensor | None, keep: Tensor, mom: InputMoments,
                     damp: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Ridge least-squares weights (out, len(keep)) and bias of a projection that now reads only the kept
    input columns, fitted so its output matches the full projection's on the calibration moments."""
    if mom.second.shape != (w.shape[1], w.shape[1]):
        raise PlanError(f"input moments {tuple(mom.second.shape)} do not match weight {tuple(w.shape)}")
    damp = REFIT_DAMP if damp is None else damp
    keep = keep.to(torch.long).cpu()
    c = _moment(mom, bias is not None)
    w64 = w.detach().to(device="cpu", dtype=torch.float64)
    ckk = c[keep][:, keep]
    diag = torch.diagonal(ckk)
    lam = damp * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    a = ckk + (lam + 1e-12) * torch.eye(keep.numel(), dtype=torch.float64)
    rhs = w64 @ c[:, keep] + lam * w64[:, keep]  # (out, kept)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        new_w = torch.cholesky_solve(rhs.T, chol).T
    else:  # numerically indefinite: least squares through a pseudo-inverse
        new_w = rhs @ torch.linalg.pinv(a, hermitian=True)
    new_b = None
    if bias is not None:
        m = mom.mean.to(torch.float64)
        new_b = bias.detach().to(device="cpu", dtype=torch.float64) + w64 @ m - new_w @ m[keep]
        new_b = new_b.to(device=bias.device, dtype=bias.dtype)
    return new_w.to(device=w.device, dtype=w.dtype).contiguous(), new_b
