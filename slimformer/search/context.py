"""Everything a search needs, built and validated before any file is written."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimformer.compression.apply import DecompositionCache, apply_plan
from slimformer.compression.calibration import collect_activation_scales, collect_hessians
from slimformer.compression.memory import plan_memory, set_deploy
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.saving import load_any
from slimformer.errors import BudgetError, ConfigError
from slimformer.evaluators.latency import LatencySettings, LatencySource, make_latency_source, resolved_source
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.hardware_profiles import HardwareProfile, load_profile
from slimformer.hardware_profiles.machine import warn_if_mismatched
from slimformer.models import ModelAdapter
from slimformer.models.base import Batch
from slimformer.search.config import SearchConfig
from slimformer.spaces.space import SearchSpace
from slimformer.threads import set_threads, using_threads


@dataclass
class EvalSets:
    """Search, held-out and calibration batches (held-out is never used during the search)."""

    search: list[Batch]
    heldout: list[Batch]
    calibration: list[Batch]


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
    return EvalSets(*(adapter.make_batches(s.inputs, d.batch_size, s.labels)
                      for s in (drawn.search, drawn.heldout, drawn.calibration)))


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

    def memory(self, plan: CompressionPlan) -> int:
        return plan_memory(self.adapter, plan).total_bytes

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
            return apply_plan(self.adapter, plan, self.cache, self.act_scales, hessians=self.hessians)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(config: SearchConfig, *, log: Any = None) -> SearchContext:
    """Validate the config against the model and data; raise SlimformerError before anything is written."""
    say = log or (lambda msg: None)
    device = resolve_device(config.device)
    if config.threads:
        set_threads(config.threads)
    profile = load_profile(config.hardware_profile)
    if resolved_source(config.latency.source, profile) == "calibrated":  # ConfigError when it has no model
        warn_if_mismatched(profile, config.latency.threads)
    adapter = load_any(config.model, max_length=config.data.max_length)
    metric = config.quality_metric or adapter.default_quality_metric
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
    say(f"model {adapter.model_id}: {len(adapter.units)} units, fp32 {fp32 / 1e6:.2f} MB, budget "
        f"{budget / 1e6:.2f} MB; computing teacher outputs")
    sets = load_eval_sets(config, adapter)
    search_eval = FidelityEvaluator(adapter, sets.search, device=device)
    if metric not in search_eval.metric_names:
        raise ConfigError(f"quality_metric {metric!r} is not available for this model/data; "
                          f"choose one of {list(search_eval.metric_names)}")
    heldout_eval = FidelityEvaluator(adapter, sets.heldout, device=device)
    act_scales = collect_activation_scales(adapter, sets.calibration) if config.space.data_aware_lowrank else None
    uses_gptq = any("gptq" in g.method for g in config.space.groups) or config.baselines
    hessians = collect_hessians(adapter, sets.calibration) if uses_gptq else None
    return SearchContext(config, adapter, space, profile, fp32, budget, min_bytes, sets, search_eval,
                         heldout_eval, act_scales, DecompositionCache(), metric, device, hessians)
