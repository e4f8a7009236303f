"""Measured latency (`latency.source: measured`): export a candidate to ONNX and time it in onnxruntime.

The bench protocol (export/bench.py) for one model: a plain CPU session with the search's thread count,
inputs of exactly `batch` x `seq` (search-set rows cycled, token rows cut or zero-padded to `seq`), warm-up
runs, then `runs` timed runs; the objective is their median, the interquartile range is recorded with it.
Results are cached by the plan's canonical form, so a plan seen again (a re-sampled point, a baseline) is
not exported twice. Plans over the memory budget are never exported: `MeasuredSource` prices them with the
roofline estimate and records that in the trial's `latency_source` attr.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimformer.compression.plan import CompressionPlan
from slimformer.errors import ConfigError
from slimformer.evaluators.latency.base import LatencyEstimate, LatencySettings, LatencySource, MeasuredSpread
from slimformer.evaluators.latency.registry import register_latency_source
from slimformer.export.bench import Spread, time_round_robin
from slimformer.export.onnx_export import export_onnx, session
from slimformer.hardware_profiles.roofline import LABEL as ESTIMATE_LABEL
from slimformer.hardware_profiles.roofline import estimate_latency
from slimformer.models.base import Batch, ModelAdapter

LABEL = "measured (exported ONNX timed in onnxruntime, median of timed runs)"
OVER_BUDGET = "estimate (over budget: not exported)"  # the trial's latency_source for a plan never exported


@dataclass(frozen=True)
class MeasuredLatency:
    """One candidate's measured latency: median and interquartile range of `runs` timed runs, in ms."""

    ms: float
    iqr_ms: float
    runs: int
    batch: int
    seq: int
    threads: int
    kernels: str
    file_bytes: int


def plan_key(plan: CompressionPlan) -> str:
    """A (canonical) plan's identity for the cache: the plan as sorted JSON."""
    return json.dumps(asdict(plan), sort_keys=True, default=str)


@dataclass
class LatencyMeter:
    """Exports and times candidates for one search (same adapter, shape, threads, kernels); caches by plan.

    Plans must be canonical (`canonical_plan`; MeasuredSource.price canonicalises): the cache is keyed by the
    plan as given."""

    adapter: ModelAdapter
    sample: Batch  # rows the timed inputs are built from (a search batch)
    batch: int = 1
    seq: int = 128
    threads: int = 1
    runs: int = 30
    warmup: int = 3
    kernels: str | None = None  # None: each unit's kernel (recorded as "per-unit"); exact / fast: an override
    cache: dict[str, MeasuredLatency] = field(default_factory=dict)

    def cached(self, plan: CompressionPlan) -> MeasuredLatency | None:
        return self.cache.get(plan_key(plan))

    def measure(self, plan: CompressionPlan, model: nn.Module | None = None, compress: Any = None) -> MeasuredLatency:
        """Median latency of `plan`'s exported model (`model`, or `compress(plan)` when not given)."""
        key = plan_key(plan)
        if key in self.cache:
            return self.cache[key]
        if model is None:
            model = compress(plan)
        with tempfile.TemporaryDirectory() as tmp:
            info = export_onnx(self.adapter, model, Path(tmp) / "candidate.onnx",
                               kernels=self.kernels)  # type: ignore[arg-type]
            sess = session(info.path, self.threads)
            feed = self.adapter.fixed_shape_feed(self.sample, self.batch, self.seq)
            times = time_round_robin({"candidate": sess}, feed, self.runs, self.warmup)["candidate"]
        s = Spread.of(times)
        result = MeasuredLatency(s.median, s.iqr, s.n, self.batch, self.seq, self.threads, info.kernel_mode,
                                 info.file_bytes)
        self.cache[key] = result
        return result


@register_latency_source("measured")
class MeasuredSource(LatencySource):
    """Times each in-budget plan's exported model (`LatencyMeter`, made on the first one); a plan over the
    memory budget (`settings.fits` false) is never exported and gets the roofline estimate instead."""

    def __init__(self, settings: LatencySettings) -> None:
        super().__init__(settings)
        if settings.sample is None or settings.compress is None or settings.fits is None:
            raise ConfigError("latency.source measured needs a sample batch, a compress hook and a fits hook")
        self.meter: LatencyMeter | None = None

    def price_canonical(self, adapter: ModelAdapter, plan: CompressionPlan) -> LatencyEstimate:
        s = self.settings
        assert s.fits is not None and s.sample is not None
        if not s.fits(plan):
            ms = estimate_latency(adapter.units, adapter.layers, plan, s.profile, batch=s.batch, seq=s.seq).ms
            return LatencyEstimate(ms, self.name, ESTIMATE_LABEL, recorded_source=OVER_BUDGET)
        if self.meter is None:
            import torch

            self.meter = LatencyMeter(adapter, s.sample, s.batch, s.seq, s.threads or torch.get_num_threads(),
                                      s.runs, kernels=s.kernels)
        m = self.meter.measure(plan, compress=s.compress)
        return LatencyEstimate(m.ms, self.name, LABEL, recorded_source="measured",
                               spread=MeasuredSpread(m.iqr_ms, m.runs, m.threads, m.kernels))
