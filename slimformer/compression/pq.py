"""Product quantisation of table rows: a tier codec cheaper per row than scalar int2 (compression/embedding_tiers.py).

A row of D values is cut into M = D / d sub-vectors of d values; each sub-space m has a codebook of K = 256
centroids (fp16, (M, K, d)) fitted by weighted k-means over the tier's rows, and a row is stored as M uint8
indexes (d = 8: one byte per 8 weights = 1 bit per weight, no per-row scales). Decoding is a pure lookup
(`codebook[m, code[m]]`, fp16 -> fp32), so torch and the ONNX lowering (Gather of the codes, Add of the sub-space
offsets, Gather of the flat codebook, Cast, Reshape) are bit-identical.

Weights: rows are fitted with weight 1 / (rank + PQ_RANK_OFFSET) by their rank in the token ranking (a Zipf
prior: a frequent row pulls its centroid closer), so the frequent end of the tier dominates the fit.
Deterministic: k-means++-free init from a seeded generator, a fixed number of Lloyd iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.errors import PlanError

PQ_CENTROIDS = 256  # codes are uint8
PQ_ITERS = 15
PQ_RANK_OFFSET = 100.0  # Zipf weight 1 / (rank + offset)
PQ_SUBDIMS = (2, 4, 8, 16)  # sub-vector widths d a `pq/d` tier may use


def check_subdim(dim: int, d: int | None) -> int:
    """The sub-vector width of a pq tier on rows of `dim` values (a one-line PlanError when it does not fit)."""
    if d is None or d not in PQ_SUBDIMS:
        raise PlanError(f"tier pq needs a sub-vector width in {PQ_SUBDIMS} as its group size (e.g. pq/8; got {d})")
    if dim % d:
        raise PlanError(f"tier pq/{d}: the row width {dim} is not a multiple of {d}")
    return d


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid of every row (|c|^2 - 2 x.c; |x|^2 does not change the argmin)."""
    return torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2).argmin(1)


def _kmeans(x: Tensor, w: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Weighted Lloyd k-means of x (n, d) -> centroids (k, d); n >= k assumed by the caller."""
    n = x.shape[0]
    c = x[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        a = _nearest(x, c)
        sw = torch.zeros(k, dtype=x.dtype).index_add_(0, a, w)
        sx = torch.zeros_like(c).index_add_(0, a, x * w[:, None])
        filled = sw > 0
        c[filled] = sx[filled] / sw[filled, None]  # an empty cluster keeps its centroid
    return c


def pq_fit(rows: Tensor, d: int, weights: Tensor | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Codes (n, M) uint8 and codebook (M, K, d) fp16 of `rows` (n, D); K = min(256, n) centroids used."""
    n, dim = rows.shape
    check_subdim(dim, d)
    m = dim // d
    k = min(PQ_CENTROIDS, n)
    x = rows.detach().to(torch.float32).reshape(n, m, d)
    w = torch.ones(n, dtype=torch.float32) if weights is None else weights.detach().to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    book = torch.zeros(m, PQ_CENTROIDS, d, dtype=torch.float16)
    codes = torch.zeros(n, m, dtype=torch.uint8)
    for j in range(m):
        xj = x[:, j].contiguous()
        c = _kmeans(xj, w, k, PQ_ITERS, gen).to(torch.float16)
        codes[:, j] = _nearest(xj, c.to(torch.float32)).to(torch.uint8)  # against the stored (fp16) centroids
        book[j, :k] = c
    return codes, book


def pq_decode(codes: Tensor, book: Tensor) -> Tensor:
    """Rows (n, M * d) fp32 of codes (n, M) and codebook (M, K, d): the lookup the ONNX graph does."""
    n, m = codes.shape
    flat = book.reshape(-1, book.shape[-1])
    idx = codes.to(torch.long) + torch.arange(m, dtype=torch.long)[None, :] * book.shape[1]
    return flat[idx].to(torch.float32).reshape(n, m * book.shape[-1])


def zipf_weights(start_rank: int, n: int) -> Tensor:
    """Fit weights of the rows ranked start_rank .. start_rank + n - 1 (see the module docstring)."""
    return 1.0 / (torch.arange(start_rank, start_rank + n, dtype=torch.float64) + PQ_RANK_OFFSET)


def pq_bytes(rows: int, dim: int, d: int) -> int:
    """Stored bytes of a pq tier: uint8 codes plus the fp16 codebook."""
    if rows == 0:
        return 0
    return rows * (dim // d) + (dim // d) * PQ_CENTROIDS * d * 2
