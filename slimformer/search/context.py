"""Everything a search needs, built and validated before any file is written."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimformer.compression.apply import DecompositionCache, apply_plan
from slimformer.compression.calibration import (
    StructureStats,
    collect_activation_scales,
    collect_hessians,
    collect_input_abs_max,
    collect_structure_stats,
)
from slimformer.compression.embedding_tiers import reference_ranking
from slimformer.compression.memory import plan_memory, set_deploy
from slimformer.compression.plan import DATA_METHODS, CompressionPlan
from slimformer.compression.saving import load_any
from slimformer.errors import BudgetError, ConfigError
from slimformer.evaluators.latency import LatencySettings, LatencySource, make_latency_source, resolved_source
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.hardware_profiles import HardwareProfile, load_profile
from slimformer.hardware_profiles.local_profile import auto_profile
from slimformer.hardware_profiles.machine import warn_if_mismatched as warn_machine
from slimformer.hardware_profiles.predict import require_linear_class
from slimformer.models import ModelAdapter
from slimformer.models.base import Batch, EvalSamples
from slimformer.search.config import SearchConfig
from slimformer.spaces.space import SearchSpace
from slimformer.threads import set_threads, using_threads


@dataclass
class EvalSets:
    """Search, held-out and calibration batches (held-out is never used during the search)."""

    search: list[Batch]
    heldout: list[Batch]
    calibration: list[Batch]
    drawn: EvalSamples | None = None  # the samples before batching (splits.json fingerprints them)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but torch sees no CUDA device; use auto or cpu")
    return name


def load_eval_sets(config: SearchConfig, adapter: ModelAdapter) -> EvalSets:
    """Load and split the configured data the way the model's family reads it."""
    d = config.data
    drawn = adapter.eval_samples(d.source, d.search_samples, d.heldout_samples, d.calibration_samples, d.seed)
    search, heldout, calibration = (adapter.make_batches(s.inputs, d.batch_size, s.labels)
                                    for s in (drawn.search, drawn.heldout, drawn.calibration))
    return EvalSets(search, heldout, calibration, drawn)


@dataclass
class SearchContext:
    """A prepared search: model, space, budget, evaluators, hardware profile and caches."""

    config: SearchConfig
    adapter: ModelAdapter
    space: SearchSpace
    profile: HardwareProfile
    fp32_bytes: int
    budget_bytes: int
    min_bytes: int
    sets: EvalSets
    search_eval: FidelityEvaluator
    heldout_eval: FidelityEvaluator
    act_scales: dict[str, Tensor] | None
    cache: DecompositionCache
    quality_metric: str
    device: str
    hessians: dict[str, Tensor] | None = None
    latency: LatencySource | None = None  # what prices the latency objective: made on first use (latency_source)
    latency_budget_ms: float | None = None  # budget.latency resolved (a relative one against fp32_latency_ms)
    fp32_latency_ms: float | None = None  # the uncompressed model, priced by the search's source (relative budgets)
    predictor: LatencySource | None = None  # cheap pricing for repair and start points (latency_predictor)
    structure_stats: StructureStats | None = None  # head/neuron input moments, when the space prunes by data
    act_max: dict[str, Tensor] | None = None  # max |input| per feature, when int8-kernel units are smoothed

    def memory(self, plan: CompressionPlan) -> int:
        return plan_memory(self.adapter, plan).total_bytes

    def over_budget(self, memory_bytes: int, latency_ms: float) -> list[str]:
        """The budgets a plan with these costs breaks: [], ["memory"], ["latency"] or both."""
        out = ["memory"] if memory_bytes > self.budget_bytes else []
        if self.latency_budget_ms is not None and latency_ms > self.latency_budget_ms:
            out.append("latency")
        return out

    def violation(self, memory_bytes: int, latency_ms: float | None) -> float:
        """How far over the budgets a plan is, each overshoot as a fraction of its budget (0: within both)."""
        v = max(0, memory_bytes - self.budget_bytes) / self.budget_bytes
        if self.latency_budget_ms is not None and latency_ms is not None:
            v += max(0.0, latency_ms - self.latency_budget_ms) / self.latency_budget_ms
        return v

    def latency_predictor(self) -> LatencySource:
        """What repair and start points price latency with: the search's own source, except that a `measured`
        search predicts with the profile's model (`auto`), since measuring a candidate takes an ONNX export."""
        if self.predictor is None:
            if self.config.latency.source != "measured":
                self.predictor = self.latency_source()
            else:
                cfg = self.config.latency
                self.predictor = make_latency_source("auto", LatencySettings(
                    self.profile, cfg.batch, cfg.seq, cfg.threads or self.config.threads))
        return self.predictor

    def predicted_ms(self, plan: CompressionPlan) -> float:
        return self.latency_predictor().price(self.adapter, plan).ms

    def latency_source(self) -> LatencySource:
        """The source `config.latency.source` names (registry: evaluators/latency), built once on first use."""
        if self.latency is None:
            cfg = self.config.latency
            self.latency = make_latency_source(cfg.source, LatencySettings(
                self.profile, cfg.batch, cfg.seq, cfg.threads or self.config.threads, cfg.runs, cfg.kernels,
                sample=self.sets.search[0] if self.sets.search else None, compress=self.compress,
                fits=lambda plan: self.memory(plan) <= self.budget_bytes))
        return self.latency

    def compress(self, plan: CompressionPlan) -> nn.Module:
        """A fresh compressed copy of the model, with this search's caches and calibration statistics.

        Runs single-threaded: compression is many small tensor ops (GPTQ's column sweep above all), which
        measured 14x slower with 2 threads than with 1 on the shared 2-core machine (0.53 s vs 7.3 s).
        """
        with using_threads(1):
            return apply_plan(self.adapter, plan, self.cache, self.act_scales, hessians=self.hessians,
                              structure_stats=self.structure_stats, act_max=self.act_max)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(config: SearchConfig, *, log: Any = None, validated: Callable[[], None] | None = None) -> SearchContext:
    """Validate the config against the model and data; raise SlimformerError before anything is written.

    `validated` is called once the model, space and budgets are checked and before the expensive part (teacher
    outputs, calibration statistics): the caller opens a shared storage there, so a bad budget creates no
    storage and a bad storage URL fails without the wait. (A latency budget of a `measured` search is checked
    after it, since the fp32 reference and the fastest plan are timed on search data.)"""
    say = log or (lambda msg: None)
    device = resolve_device(config.device)
    if config.threads:
        set_threads(config.threads)
    profile = load_profile(config.hardware_profile)
    if resolved_source(config.latency.source, profile) == "calibrated":  # ConfigError when it has no model
        if any("int8" in g.kernel for g in config.space.groups):  # found now, not as a failed trial
            require_linear_class(profile, "dynamic_int8")
    adapter = load_any(config.model, max_length=config.data.max_length)
    metric = config.quality_metric or adapter.default_quality_metric
    valid = list(dict.fromkeys((*adapter.metric_names(True), *adapter.metric_names(False))))
    if metric not in valid:  # before any data or teacher outputs: a metric of another kind of model
        raise ConfigError(f"quality_metric {metric!r} does not apply to this {adapter.kind} model; choose one of "
                          f"{valid}")
    space = SearchSpace(adapter, config.space)
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    if config.deploy == "onnx":  # budget.memory applies to the ONNX file: every plan_memory below prices it
        from slimformer.export import graph_overhead_bytes

        set_deploy(adapter, "onnx", graph_overhead_bytes(adapter))
    budget = config.budget.to_bytes(fp32)
    min_plan = space.min_memory_plan()
    min_bytes = plan_memory(adapter, min_plan).total_bytes
    if min_bytes > budget:
        raise BudgetError(
            f"budget.memory {config.budget.memory} = {budget / 1e6:.2f} MB, but the smallest plan in the space "
            f"needs {min_bytes / 1e6:.2f} MB ({100 * min_bytes / fp32:.1f}% of fp32); raise the budget or add "
            "cheaper choices (4 bits, lower rank_fraction) to the space"
        )
    seed_everything(config.data.seed)
    sets = load_eval_sets(config, adapter)  # before any line on stderr: bad data is the only line
    if config.latency.source == "auto" and ("latency" in config.objectives or config.budget.latency is not None):
        profile = auto_profile(profile, config.latency.threads, log)  # this machine's own model (one line if not)
    measured = config.latency.source == "measured"
    lat_budget: tuple[float, float | None] | None = None
    if config.budget.latency is not None and not measured:  # cheap sources: checked before the teacher outputs
        lat_budget = latency_budget(config, adapter, space, profile, _settings(config, profile))
    if validated is not None:
        validated()
    warn_if_mismatched(config, profile, log)
    if space.has_tiers:  # embedding tiers rank rows by token frequency on the search's own text (or a named corpus)
        reference = [*sets.search, *sets.calibration]
        space.use_token_ranking(reference_ranking(adapter, config.space.tier_reference, reference))
    say(f"model {adapter.model_id}: {len(adapter.units)} units, fp32 {fp32 / 1e6:.2f} MB, budget "
        f"{budget / 1e6:.2f} MB; computing teacher outputs")
    search_eval = FidelityEvaluator(adapter, sets.search, device=device)
    if metric not in search_eval.metric_names:
        raise ConfigError(f"quality_metric {metric!r} is not available for this model/data; "
                          f"choose one of {list(search_eval.metric_names)}")
    heldout_eval = FidelityEvaluator(adapter, sets.heldout, device=device)
    act_scales = collect_activation_scales(adapter, sets.calibration) if config.space.data_aware_lowrank else None
    uses_gptq = any(m in DATA_METHODS for g in config.space.groups for m in g.method) or config.baselines
    hessians = collect_hessians(adapter, sets.calibration) if uses_gptq else None
    prunes = any(g.heads_kept or g.neurons_kept for g in config.space.groups)
    structure_data = prunes and (config.space.structure.importance == "activation" or config.space.structure.refit)
    structure_stats = collect_structure_stats(adapter, sets.calibration) if structure_data else None
    smooths = any("int8" in g.kernel and g.smooth is not None for g in config.space.groups)
    act_max = collect_input_abs_max(adapter, sets.calibration) if smooths else None  # SmoothQuant factors
    ctx = SearchContext(config, adapter, space, profile, fp32, budget, min_bytes, sets, search_eval,
                        heldout_eval, act_scales, DecompositionCache(), metric, device, hessians,
                        structure_stats=structure_stats, act_max=act_max)
    if config.budget.latency is not None and measured:  # the fp32 reference and the fastest plan are timed
        lat_budget = latency_budget(config, adapter, space, profile, replace(
            _settings(config, profile), sample=sets.search[0] if sets.search else None, compress=ctx.compress,
            fits=lambda plan: True), predict=ctx.predicted_ms)
    if lat_budget is not None:
        ctx.latency_budget_ms, ctx.fp32_latency_ms = lat_budget
    return ctx


def _settings(config: SearchConfig, profile: HardwareProfile) -> LatencySettings:
    cfg = config.latency
    return LatencySettings(profile, cfg.batch, cfg.seq, cfg.threads or config.threads, cfg.runs, cfg.kernels)


def warn_if_mismatched(config: SearchConfig, profile: HardwareProfile, log: Callable[[str], None] | None) -> None:
    """One line (the search's log, else the `slimformer` logger) when latency matters to this search (an objective
    or a budget), is predicted, and the profile was made on another CPU, runtime or thread count; the search goes
    on with the profile."""
    if config.latency.source == "measured" or ("latency" not in config.objectives and config.budget.latency is None):
        return
    warn_machine(profile, config.latency.threads, log)


def fastest_params(space: SearchSpace, price: Callable[[CompressionPlan], float]) -> dict[str, Any]:
    """The space's fastest plan as parameters: each parameter at its lowest-latency choice with the others held
    (coordinate descent from the cheapest-bytes choices until no parameter changes; latency is not monotone in
    bits, so every choice is priced). Exact when latency is a sum of per-parameter terms."""
    dists = space.distributions()
    params = {name: order[0] for name, order in space.choice_costs().items()}
    now = price(space.plan_from_params(params))
    for _ in range(4):
        changed = False
        for name, d in dists.items():
            for c in d.choices:
                if c == params[name]:
                    continue
                ms = price(space.plan_from_params(params | {name: c}))
                if ms < now * (1 - 1e-9):
                    params, now, changed = params | {name: c}, ms, True
        if not changed:
            break
    return params


def latency_budget(config: SearchConfig, adapter: ModelAdapter, space: SearchSpace, profile: HardwareProfile,
                   settings: LatencySettings, predict: Callable[[CompressionPlan], float] | None = None
                   ) -> tuple[float, float | None]:
    """(budget.latency in ms, the fp32 model's latency when the budget is relative); BudgetError when even the
    fastest plan of the space is over it. `predict` finds the fastest plan when the source is slow (measured);
    the source then prices it."""
    source = make_latency_source(config.latency.source, settings)

    def price(plan: CompressionPlan) -> float:
        return source.price(adapter, plan).ms

    fp32_ms = price(CompressionPlan()) if config.budget.latency_is_relative else None
    budget = config.budget.latency_ms(fp32_ms)
    assert budget is not None
    fastest = space.plan_from_params(fastest_params(space, predict or price))
    fastest_ms = price(fastest)
    if fastest_ms > budget:
        measured = config.latency.source == "measured"
        kind, where = ("measured", "on this machine") if measured else ("predicted", f"on profile {profile.name}")
        of_fp32 = f" of the fp32 model's {fp32_ms:.3g} ms = {budget:.3g} ms" if fp32_ms is not None else ""
        raise BudgetError(
            f"budget.latency {config.budget.latency}{of_fp32} is below the fastest plan of the space ({kind} "
            f"{fastest_ms:.3g} ms at batch {settings.batch}, seq {settings.seq} {where}); raise it or add faster "
            "choices (fewer heads or neurons, lower rank_fraction)")
    return budget, fp32_ms
