"""Fitting the whole-graph residuals at calibration: time the reference models' fixed plans (references.py) and a
few sampled plans (random mixed plans drawn from `SAMPLE_SEED`, never the validation plans' seed) round-robin as
whole exported models, in several interleaved passes (model_timing.py), and fit each family's global `Residual`
(residual.py), its shape-local `ShapeResidual` at every timed shape (shape_residual.py) and the FLOPs proxy's
constant against the kernel model's per-class prediction (predict.py)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimformer.compression.plan import CompressionPlan
from slimformer.hardware_profiles.model_timing import WARM_REPEAT, measure_plan_passes, warm_repeat
from slimformer.hardware_profiles.predict import predict, require_model
from slimformer.hardware_profiles.profile import SCALE_BOUNDS, HardwareProfile, LatencyModel, Residual
from slimformer.hardware_profiles.references import reference_adapter, reference_plans
from slimformer.hardware_profiles.residual import FAMILIES, glue_features, kernel_family
from slimformer.hardware_profiles.shape_residual import ShapePoint, fit_shape_residual, group_ms, kept_heads
from slimformer.models.base import ModelAdapter

SAMPLE_SEED = 1_000_003  # sampled plans for the residual; validation draws from seed 0 (validate.validation_plans)
REFERENCE_PASSES = 3  # interleaved round-robin passes per reference shape (median of the pass medians)


def sampled_plans(adapter: ModelAdapter, n: int, seed: int = SAMPLE_SEED) -> dict[str, CompressionPlan]:
    """`n` random mixed plans (validate.random_plan, compute kernels drawn too) drawn from `seed`, named
    sample00...: the few-shot plans the shape-local residual is fitted on besides the fixed reference plans."""
    from slimformer.hardware_profiles.validate import KERNEL_SEED, random_plan

    rng, krng = random.Random(seed), random.Random(seed + KERNEL_SEED)
    return {f"sample{i:02d}": random_plan(adapter, rng, krng)[0] for i in range(n)}


def reference_runs(est_ms: float, plans: int, budget_ms: float = 5000.0, repeat: int = WARM_REPEAT) -> int:
    """Round-robin rounds for the reference models: 15, or up to 200 while all of them fit in `budget_ms`
    (a 0.3 ms ViT gets more rounds for the price of a few MiniLM ones; its residual is fitted on them). 5 s a
    pass: on a shared host a sub-millisecond model's level drifts by a few % over seconds (other tenants' use
    of the shared L3), and the residual's level is only as good as the time it averages over."""
    return int(min(200, max(15, budget_ms / max(plans * repeat * est_ms, 1e-3))))


def fit_residuals(lm: LatencyModel, profile: HardwareProfile, references: tuple[str, ...], threads: int,
                  work: Path, progress: Callable[[int, str], None],
                  shapes: dict[str, tuple[tuple[int, int], ...]] | None = None, samples: int = 0,
                  passes: int = REFERENCE_PASSES) -> list[dict]:
    """Time the reference plans and `samples` sampled plans of each reference model round-robin in `passes`
    passes per shape; fit its family's global Residual over all shapes, a ShapeResidual per shape, and the FLOPs
    proxy's constant over all of them; returns the raw points."""
    bare = profile.model_copy(update={"latency_model": lm.model_copy(update={"residual": {}, "local_residual": {}})})
    points: list[dict] = []
    for ref in references:
        adapter = reference_adapter(ref)
        plans = {**reference_plans(adapter), **sampled_plans(adapter, samples)}
        for batch, seq in (shapes or {}).get(ref, adapter.default_latency_shapes()):
            est = predict(adapter, CompressionPlan(), batch, seq, bare).ms
            rep = warm_repeat(est)  # as warm as validation's and the bench's turns (model_timing.warm_repeat)
            runs = reference_runs(est, len(plans), repeat=rep)
            measured = measure_plan_passes(adapter, plans, batch, seq, threads, work / ref.replace("/", "_"), runs=runs,
                                           passes=passes, repeat=rep)
            for name, pass_ms in measured.items():
                ms = float(np.median(pass_ms))
                p = predict(adapter, plans[name], batch, seq, bare)
                fam = {f: 0.0 for f in (*FAMILIES, "other")}
                for cls, v in p.breakdown.items():
                    fam[kernel_family(cls)] += v
                points.append({"family": adapter.family, "model": ref, "plan": name, "batch": batch, "seq": seq,
                               "families": fam, "groups": group_ms(p.breakdown),
                               "heads": kept_heads(adapter, plans[name]),
                               "glue": glue_features(adapter, plans[name], batch, seq), "flops": p.flops,
                               "measured_ms": ms, "pass_ms": pass_ms,
                               "spread": (max(pass_ms) - min(pass_ms)) / ms if ms > 0 else 0.0})
            progress(1, f"reference {ref} {batch}x{seq}")
    for family in sorted({p["family"] for p in points}):
        pts = [p for p in points if p["family"] == family]
        lm.residual[family] = _global_residual(pts)
        lm.local_residual[family] = [
            fit_shape_residual([ShapePoint(f"{p['model']}:{p['plan']}", p["groups"], p["heads"], p["measured_ms"],
                                           p["spread"]) for p in pts if (p["batch"], p["seq"]) == shape], *shape)
            for shape in sorted({(p["batch"], p["seq"]) for p in pts})]
    if points:
        lm.flops_ms_per_gflop = float(np.median([p["measured_ms"] / (p["flops"] * 1e-9) for p in points]))
    return points


def _global_residual(pts: list[dict]) -> Residual:
    """The family's Residual over every timed shape (bounded least squares on relative error)."""
    from scipy.optimize import lsq_linear

    used = [f for f in FAMILIES if any(p["families"][f] > 0 for p in pts)]
    x = np.array([[p["families"][f] for f in used] + list(p["glue"]) for p in pts])
    t = np.array([p["measured_ms"] - p["families"]["other"] for p in pts])
    w = 1.0 / np.array([p["measured_ms"] for p in pts])
    lo = [SCALE_BOUNDS[0]] * len(used) + [0.0] * 4
    hi = [SCALE_BOUNDS[1]] * len(used) + [np.inf] * 4
    coef = lsq_linear(x * w[:, None], t * w, bounds=(lo, hi)).x
    pred = x @ coef + np.array([p["families"]["other"] for p in pts])
    meas = np.array([p["measured_ms"] for p in pts])
    rmse = float(np.sqrt(np.mean(((pred - meas) / meas) ** 2)))
    g = coef[len(used):]
    return Residual(class_scale={f: round(float(c), 4) for f, c in zip(used, coef, strict=False)},
                    per_score_ns=float(g[0]), per_layer_head_token_us=float(g[1]), per_layer_token_us=float(g[2]),
                    per_layer_ms=float(g[3]), fitted_on=sorted({f"{p['model']}:{p['plan']}" for p in pts}),
                    rmse_rel=round(rmse, 4))


def refit(profile: HardwareProfile, references: tuple[str, ...], work: Path,
          shapes: dict[str, tuple[tuple[int, int], ...]] | None = None, log: Callable[[str], None] | None = None,
          samples: int = 8) -> HardwareProfile:
    """The profile with its residuals re-fitted on freshly timed reference models and `samples` sampled plans
    (kernel tables kept): for a profile whose micro-benchmarks ran under other load, or on another day, than
    the models it will price (few-shot adaptation of existing tables)."""
    lm = require_model(profile).model_copy(deep=True)
    lm.residual, lm.local_residual = {}, {}
    load0 = [round(x, 2) for x in os.getloadavg()]
    fit_residuals(lm, profile, references, profile.threads, work, lambda _k, s: log(s) if log else None, shapes,
                  samples=samples)
    note = (f" Residual re-fitted on {', '.join(references)} (load average {load0}) with "
            "`slimformer calibrate --refit-residual`.")
    return profile.model_copy(update={"latency_model": lm, "notes": profile.notes + note, "validation": []})
