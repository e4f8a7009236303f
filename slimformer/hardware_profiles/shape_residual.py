"""The shape-local whole-graph residual: what the kernel model misses in a full exported model, fitted at one
(batch, seq) shape on a few whole models timed at calibration (few-shot adaptation, the HELP idea).

Why (2026-12-02, docs/BENCHMARKS.md "Latency model on the CPU at hand"): scored against stored measurements of
the 60 held-out plans, the kernel sum of every profile ranks plans well (MiniLM tau 0.91-0.93) and, after one
scale factor, is within 1.2-2.4% MAPE; the error is the absolute level the global residual (residual.py) puts
on it. That residual is one formula across shapes (seq 16 to 128, relative error over all of them; it misses
the reference models by 6-7% RMS), and its glue terms are nearly collinear, so two calibrations split the
same time differently (per attention score vs per token: predictions 3-17% apart). Here, per shape:

    ms = sum over kernel groups g of scale[g] * kernel ms of g + const_ms + per_head_ms * kept heads

Groups: the linear kernel families (residual.FAMILIES), the attention core, elementwise ops (residual add +
LayerNorm, GELU, Add), embeddings, and any other class by its first name part (a new kernel class gets its own
group without a code change). Fitted by bounded least squares on relative error over the reference plans
and the sampled plans (seeded apart from validation's plans), with a ridge pull of every scale towards 1 of
strength `RIDGE` (as much as a few pseudo-observations): a group with little time in the points (embeddings:
0.1% of MiniLM) keeps about 1 instead of absorbing noise, and the scales stay in LOCAL_SCALE_BOUNDS. The
constant and the per-head term are non-negative. At a shape no local residual was fitted at, predict.py uses
the global residual as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from slimformer.compression.plan import CompressionPlan, LayerSpec
from slimformer.hardware_profiles.profile import LOCAL_SCALE_BOUNDS, ShapeResidual
from slimformer.hardware_profiles.residual import FAMILIES, LOWRANK_PREFIX, kernel_family
from slimformer.models.base import ModelAdapter

RIDGE = 0.3  # pull of each group scale towards 1 (rows of the relative-error system have value ~1)
ELEMENTWISE_CLASSES = ("layernorm", "gelu", "add")


def group_of(cls: str) -> str:
    """The residual group of a breakdown class: 'lowrank|...' -> 'lowrank', 'matmulnbits:4:32' -> 'matmulnbits:4',
    'attention', 'layernorm'/'gelu'/'add' -> 'elementwise', gathers -> 'embedding', else the class's first part."""
    if cls.startswith(LOWRANK_PREFIX):
        return "lowrank"
    if cls in ELEMENTWISE_CLASSES:
        return "elementwise"
    head = cls.split(":")[0]
    if head in ("gather", "fp16_gather", "gather_dequant", "gather_block_quantized"):
        return "embedding"
    fam = kernel_family(cls)
    return fam if fam in FAMILIES else head


def group_ms(breakdown: Mapping[str, float]) -> dict[str, float]:
    """Kernel ms by residual group."""
    out: dict[str, float] = {}
    for cls, v in breakdown.items():
        g = group_of(cls)
        out[g] = out.get(g, 0.0) + v
    return out


def kept_heads(adapter: ModelAdapter, plan: CompressionPlan) -> float:
    """Attention heads the plan keeps, summed over layers."""
    return float(sum(plan.layers.get(i.index, LayerSpec()).heads_kept or i.num_heads for i in adapter.layers))


@dataclass(frozen=True)
class ShapePoint:
    """One whole model timed at the residual's shape: its kernel ms by group, kept heads, measured ms and the
    relative spread of its pass medians."""

    name: str
    groups: dict[str, float]
    heads: float
    measured_ms: float
    spread: float = 0.0


def fit_shape_residual(points: Sequence[ShapePoint], batch: int, seq: int, ridge: float = RIDGE,
                       bounds: tuple[float, float] = LOCAL_SCALE_BOUNDS) -> ShapeResidual:
    """Bounded ridge least squares on relative error (see the module docstring); ValueError without points."""
    from scipy.optimize import lsq_linear

    pts = [p for p in points if p.measured_ms > 0 and math.isfinite(p.measured_ms)]
    if not pts:
        raise ValueError("fit_shape_residual needs at least one timed model")
    groups = sorted({g for p in pts for g, v in p.groups.items() if v > 0})
    x = np.array([[p.groups.get(g, 0.0) for g in groups] + [1.0, p.heads] for p in pts], float)
    y = np.array([p.measured_ms for p in pts], float)
    a, t = x / y[:, None], np.ones(len(y))
    n = len(groups)
    if ridge > 0 and n:
        reg = np.zeros((n, n + 2))
        reg[:, :n] = ridge * np.eye(n)
        a, t = np.vstack([a, reg]), np.concatenate([t, ridge * np.ones(n)])
    lo = [bounds[0]] * n + [0.0, 0.0]
    hi = [bounds[1]] * n + [np.inf, np.inf]
    coef = lsq_linear(a, t, bounds=(lo, hi)).x
    rmse = float(np.sqrt(np.mean((x @ coef / y - 1.0) ** 2)))
    scale = {g: round(float(c), 4) for g, c in zip(groups, coef, strict=False)}
    return ShapeResidual(batch=batch, seq=seq, scale=scale,
                         const_ms=float(coef[n]), per_head_ms=float(coef[n + 1]), fitted_on=[p.name for p in pts],
                         rmse_rel=round(rmse, 4), pass_spread=round(float(np.median([p.spread for p in pts])), 4))


def apply_shape_residual(res: ShapeResidual, breakdown: Mapping[str, float], heads: float) -> float:
    """Predicted ms of a plan at the residual's shape from its per-class kernel ms and kept heads."""
    ms = sum(v * res.scale.get(g, 1.0) for g, v in group_ms(breakdown).items())
    return ms + res.const_ms + res.per_head_ms * heads


def local_for(shapes: Sequence[ShapeResidual], batch: int, seq: int) -> ShapeResidual | None:
    """The local residual fitted at exactly (batch, seq), or None."""
    return next((r for r in shapes if r.batch == batch and r.seq == seq), None)
