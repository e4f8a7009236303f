"""Scoring one plan: its latency objective (priced as `latency.source` says), exact memory, and quality.

Shared by the trial loop (runner), multi-fidelity pruning, baselines and the run directory's held-out scoring,
none of which needs the Optuna driver itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna

from slimformer.compression.apply import canonical_plan
from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan
from slimformer.evaluators.latency import estimate_latency
from slimformer.evaluators.measured import LatencyMeter, MeasuredLatency
from slimformer.hardware_profiles.predict import predict as predict_latency
from slimformer.hardware_profiles.predict import resolved_source
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


def latency_ms(ctx: SearchContext, plan: CompressionPlan) -> float:
    """The latency objective for `plan`, priced as `latency.source` says (see LatencyConfig), for the model
    `apply_plan` builds (shared layers run their representative's specs)."""
    cfg = ctx.config.latency
    plan = canonical_plan(ctx.adapter, plan)
    if cfg.source == "measured":  # export and time it; over-budget plans are never exported: estimate
        if ctx.memory(plan) <= ctx.budget_bytes:
            return measured_latency(ctx, plan).ms
        return estimate_latency(ctx.adapter.units, ctx.adapter.layers, plan, ctx.profile, batch=cfg.batch,
                                seq=cfg.seq).ms
    if resolved_source(cfg.source, ctx.profile) == "calibrated":  # the profile's onnxruntime kernel model
        return predict_latency(ctx.adapter, plan, cfg.batch, cfg.seq, ctx.profile).ms
    return estimate_latency(ctx.adapter.units, ctx.adapter.layers, plan, ctx.profile, batch=cfg.batch,
                            seq=cfg.seq).ms


def measured_latency(ctx: SearchContext, plan: CompressionPlan) -> MeasuredLatency:
    """`plan`'s exported model timed with the bench protocol (cached by plan; see evaluators/measured.py)."""
    if ctx.latency_meter is None:
        import torch

        cfg = ctx.config.latency
        threads = cfg.threads or ctx.config.threads or torch.get_num_threads()
        ctx.latency_meter = LatencyMeter(ctx.adapter, ctx.sets.search[0], cfg.batch, cfg.seq, threads, cfg.runs,
                                         kernels=cfg.kernels)
    return ctx.latency_meter.measure(plan, compress=ctx.compress)


def latency_record(ctx: SearchContext, plan: CompressionPlan) -> TrialRecord:
    """What the trial records about its latency value: where it came from (and, measured, its spread)."""
    if ctx.config.latency.source != "measured":
        return TrialRecord()
    m = ctx.latency_meter.cached(plan) if ctx.latency_meter is not None else None
    if m is None:
        return TrialRecord(latency_source="estimate (over budget: not exported)")
    return TrialRecord(latency_source="measured", latency_iqr_ms=m.iqr_ms, latency_runs=m.runs,
                       latency_threads=m.threads, latency_kernels=m.kernels)


def trial_plan(ctx: SearchContext, trial: optuna.trial.FrozenTrial) -> CompressionPlan:
    """Rebuild a trial's plan from its stored parameters."""
    return ctx.space.plan_from_params(trial.params)
