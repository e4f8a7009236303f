"""Scoring one plan: its latency objective (priced as `latency.source` says), exact memory, and quality.

Shared by the trial loop (runner), multi-fidelity pruning, baselines and the run directory's held-out scoring,
none of which needs the Optuna driver itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna

from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan
from slimformer.evaluators.latency import LatencyEstimate
from slimformer.search.context import SearchContext
from slimformer.search.records import TrialRecord


@dataclass(frozen=True)
class Evaluation:
    """One plan's scores: quality metrics on a data set, estimated latency, exact memory, timings."""

    metrics: dict[str, float]
    quality: float
    latency_ms: float
    memory_bytes: int
    apply_s: float
    eval_s: float


def evaluate_plan(ctx: SearchContext, plan: CompressionPlan, heldout: bool = False) -> Evaluation:
    """Compress a fresh copy with `plan` and score it (search set, or held-out set)."""
    mem = plan_memory(ctx.adapter, plan).total_bytes
    lat = latency_ms(ctx, plan)
    t0 = time.perf_counter()
    model = ctx.compress(plan)
    t1 = time.perf_counter()
    result = (ctx.heldout_eval if heldout else ctx.search_eval).evaluate(model)
    t2 = time.perf_counter()
    return Evaluation(result.metrics, result.value(ctx.quality_metric), lat, mem, t1 - t0, t2 - t1)


def price_latency(ctx: SearchContext, plan: CompressionPlan) -> LatencyEstimate:
    """The latency objective for `plan`, priced by the search's latency source (`latency.source`; see
    evaluators/latency), for the model `apply_plan` builds (shared layers run their representative's specs)."""
    return ctx.latency_source().price(ctx.adapter, plan)


def latency_ms(ctx: SearchContext, plan: CompressionPlan) -> float:
    """`price_latency(ctx, plan).ms`."""
    return price_latency(ctx, plan).ms


def latency_record(priced: LatencyEstimate) -> TrialRecord:
    """What the trial records about its latency value: the value and, measured, where it came from and its
    spread (the keys of `LatencyEstimate.trial_attrs`)."""
    s = priced.spread
    return TrialRecord(latency_ms=priced.ms, latency_source=priced.recorded_source,
                       latency_iqr_ms=None if s is None else s.iqr_ms, latency_runs=None if s is None else s.runs,
                       latency_threads=None if s is None else s.threads,
                       latency_kernels=None if s is None else s.kernels)


def trial_plan(ctx: SearchContext, trial: optuna.trial.FrozenTrial) -> CompressionPlan:
    """Rebuild a trial's plan from its stored parameters."""
    return ctx.space.plan_from_params(trial.params)
