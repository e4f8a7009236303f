"""The whole-graph residual: what micro-benchmarks of single kernels miss in a full exported model.

Fitted at calibration on full exports of reference models (uniform fp32, int8 per row, int8 g32, int4
g32 and an fp32 model with half its heads and FFN neurons pruned, at a few shapes), never on validation
plans. Its terms: one in-graph scale per kernel family (MatMul, DequantizeLinear+Gemm int8,
MatMulNBits int8, MatMulNBits int4: the same kernel runs slower or faster inside a model than alone,
e.g. because its dequantised weights evict the next op's data), bounded to [0.8, 1.6] so that they
cannot trade off freely against the glue terms (the references scale both with tokens), plus glue per block:
a constant, a term per token, a term per token and kept head and one per attention score (kept heads x
seq^2: the masking, NaN guard and softmax the exported attention runs over scores).
Low-rank factors (the two thin MatMuls of a rank-r linear) form a family of their own ('lowrank', fitted on
two low-rank reference plans): at 17 tokens a chain of thin MatMuls runs faster in the graph than alone
(the ViT's held-out errors grew with the number of low-rank linears, correlation 0.66, before it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec
from slimformer.hardware_profiles.profile import HardwareProfile, LatencyModel, Residual
from slimformer.models.base import ModelAdapter

FAMILIES = ("matmul", "dequant_gemm:8", "matmulnbits:8", "matmulnbits:4", "lowrank")
SCALE_BOUNDS = (0.8, 1.6)
LOWRANK_PREFIX = "lowrank|"  # breakdown key of a low-rank factor's kernel: 'lowrank|matmulnbits:4:32'


def kernel_family(cls: str) -> str:
    """'matmulnbits:4:32' -> 'matmulnbits:4'; 'lowrank|<class>' -> 'lowrank'; classes outside FAMILIES ->
    'other' (kept at scale 1)."""
    if cls.startswith(LOWRANK_PREFIX):
        return "lowrank"
    fam = ":".join(cls.split(":")[:2])
    return fam if fam in FAMILIES else "other"


Glue = tuple[float, float, float, float]


def glue_features(adapter: ModelAdapter, plan: CompressionPlan, batch: int, seq: int) -> Glue:
    """(kept heads x batch x seq^2 / 1e6 summed over layers, kept-head share x tokens / 1000 summed over
    layers, layers x tokens / 1000, layers)."""
    tokens = batch * seq * 1e-3
    heads = share = 0.0
    for i in adapter.layers:
        kept = plan.layers.get(i.index, LayerSpec()).heads_kept or i.num_heads
        heads += kept
        share += kept / i.num_heads
    n = len(adapter.layers)
    return heads * batch * seq * seq * 1e-6, share * tokens, n * tokens, float(n)


def apply_residual(res: Residual, breakdown: dict[str, float], glue: Glue) -> float:
    """Predicted ms from the per-class kernel ms and the plan's glue features."""
    ms = 0.0
    for cls, v in breakdown.items():
        fam = kernel_family(cls)
        if fam == "lowrank" and fam not in res.class_scale:  # a profile fitted before the family existed
            fam = kernel_family(cls[len(LOWRANK_PREFIX):])
        ms += v * (res.class_scale.get(fam, res.scale) if fam != "other" else 1.0)
    return ms + glue[0] * res.per_score_ns + glue[1] * res.per_layer_head_token_us \
        + glue[2] * res.per_layer_token_us + glue[3] * res.per_layer_ms + res.const_ms


def reference_plans(adapter: ModelAdapter) -> dict[str, CompressionPlan]:
    """The uniform plans, one pruned plan and two low-rank plans the residual is fitted on (low rank: every
    linear at a quarter of its smaller side in fp32, and at an eighth in int4 g32; embeddings stay dense)."""
    u = [x.name for x in adapter.units]
    pruned = {i.index: LayerSpec(heads_kept=max(1, i.num_heads // 2), neurons_kept=max(1, i.intermediate // 2))
              for i in adapter.layers}
    lin = [x for x in adapter.units if x.role != "embedding"]
    return {"fp32": CompressionPlan(),
            "int8": CompressionPlan(units={n: UnitSpec(bits=8) for n in u}),
            "int8-g32": CompressionPlan(units={n: UnitSpec(bits=8, group_size=32) for n in u}),
            "int4-g32": CompressionPlan(units={n: UnitSpec(bits=4, group_size=32) for n in u}),
            "pruned-half": CompressionPlan(layers=pruned),
            "lowrank-quarter": CompressionPlan(units={x.name: UnitSpec(rank=max(8, min(x.shape) // 4)) for x in lin}),
            "lowrank-eighth-int4": CompressionPlan(units={x.name: UnitSpec(rank=max(8, min(x.shape) // 8), bits=4,
                                                                          group_size=32) for x in lin})}


def reference_runs(est_ms: float, plans: int, budget_ms: float = 2000.0) -> int:
    """Round-robin rounds for the reference models: 15, or up to 100 while all of them fit in `budget_ms`
    (a 0.3 ms ViT gets 100 rounds for the price of a few MiniLM ones; its residual is fitted on them)."""
    from slimformer.hardware_profiles.measure_models import WARM_REPEAT

    return int(min(100, max(15, budget_ms / max(plans * WARM_REPEAT * est_ms, 1e-3))))


def fit_residuals(lm: LatencyModel, profile: HardwareProfile, references: tuple[str, ...], threads: int,
                  work: Path, progress: Callable[[int, str], None],
                  shapes: dict[str, tuple[tuple[int, int], ...]] | None = None) -> list[dict]:
    """Time the reference plans of each reference model round-robin, fit its family's Residual (and the
    FLOPs proxy's constant over all of them); returns the raw points."""
    from scipy.optimize import lsq_linear

    from slimformer.hardware_profiles.calibrate import default_shapes, reference_adapter
    from slimformer.hardware_profiles.measure_models import measure_plans
    from slimformer.hardware_profiles.predict import predict

    bare = profile.model_copy(update={"latency_model": lm.model_copy(update={"residual": {}})})
    points: list[dict] = []
    for ref in references:
        adapter = reference_adapter(ref)
        plans = reference_plans(adapter)
        for batch, seq in (shapes or {}).get(ref, default_shapes(adapter)):
            runs = reference_runs(predict(adapter, CompressionPlan(), batch, seq, bare).ms, len(plans))
            measured = measure_plans(adapter, plans, batch, seq, threads, work / ref.replace("/", "_"), runs=runs)
            for name, ms in measured.items():
                p = predict(adapter, plans[name], batch, seq, bare)
                fam = {f: 0.0 for f in (*FAMILIES, "other")}
                for cls, v in p.breakdown.items():
                    fam[kernel_family(cls)] += v
                points.append({"family": adapter.family, "model": ref, "plan": name, "batch": batch, "seq": seq,
                               "families": fam, "glue": glue_features(adapter, plans[name], batch, seq),
                               "flops": p.flops, "measured_ms": ms})
            progress(1, f"reference {ref} {batch}x{seq}")
    for family in sorted({p["family"] for p in points}):
        pts = [p for p in points if p["family"] == family]
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
        lm.residual[family] = Residual(
            class_scale={f: round(float(c), 4) for f, c in zip(used, coef, strict=False)},
            per_score_ns=float(g[0]), per_layer_head_token_us=float(g[1]), per_layer_token_us=float(g[2]),
            per_layer_ms=float(g[3]),
            fitted_on=sorted({f"{p['model']}:{p['plan']}" for p in pts}), rmse_rel=round(rmse, 4))
    if points:
        lm.flops_ms_per_gflop = float(np.median([p["measured_ms"] / (p["flops"] * 1e-9) for p in points]))
    return points


def refit(profile: HardwareProfile, references: tuple[str, ...], work: Path,
          shapes: dict[str, tuple[tuple[int, int], ...]] | None = None, log: Callable[[str], None] | None = None
          ) -> HardwareProfile:
    """The profile with its residuals re-fitted on freshly timed reference models (kernel tables kept):
    for a profile whose micro-benchmarks ran under other load than the models it will price."""
    import os

    from slimformer.hardware_profiles.predict import require_model

    lm = require_model(profile).model_copy(deep=True)
    lm.residual = {}
    load0 = [round(x, 2) for x in os.getloadavg()]
    fit_residuals(lm, profile, references, profile.threads, work, lambda _k, s: log(s) if log else None, shapes)
    note = (f" Residual re-fitted on {', '.join(references)} (load average {load0}) with "
            "`slimformer calibrate --refit-residual`.")
    return profile.model_copy(update={"latency_model": lm, "notes": profile.notes + note, "validation": []})
