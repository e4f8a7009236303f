"""Measured latency (`latency.source: measured`): export a candidate to ONNX and time it in onnxruntime.

The bench protocol (export/bench.py) for one model: a plain CPU session with the search's thread count,
inputs of exactly `batch` x `seq` (search-set rows cycled, token rows cut or zero-padded to `seq`), warm-up
runs, then `runs` timed runs; the objective is their median, the interquartile range is recorded with it.
Results are cached by the plan's canonical form, so a plan seen again (a re-sampled point, a baseline) is
not exported twice. Plans over the memory budget are never exported (the caller prices them otherwise).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from slimformer.compression.plan import CompressionPlan
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.export.bench import Spread, time_round_robin
from slimformer.export.onnx_export import export_onnx, session
from slimformer.models.base import Batch, ModelAdapter

LABEL = "measured (exported ONNX timed in onnxruntime, median of timed runs)"


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


def fixed_shape_feed(adapter: ModelAdapter, batch: Batch, n: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs of exactly `n` rows (rows of `batch` cycled) and, for token inputs, `seq` columns (cut, or
    zero-padded with the attention mask 0): latency depends on the shape, not on the words."""
    feed = {}
    for name, t in batch.inputs.items():
        a = t.detach().cpu().numpy()
        a = a[np.arange(n) % a.shape[0]]
        if adapter.family != "timm" and a.ndim == 2:
            out = np.zeros((n, seq), dtype=a.dtype)
            out[:, : min(seq, a.shape[1])] = a[:, :seq]
            a = out
        feed[name] = a
    return feed


def plan_key(adapter: ModelAdapter, plan: CompressionPlan) -> str:
    """A plan's identity for the cache: its canonical form as sorted JSON."""
    return json.dumps(asdict(canonical_plan(adapter, plan)), sort_keys=True, default=str)


@dataclass
class LatencyMeter:
    """Exports and times candidates for one search (same adapter, shape, threads, kernels); caches by plan."""

    adapter: ModelAdapter
    sample: Batch  # rows the timed inputs are built from (a search batch)
    batch: int = 1
    seq: int = 128
    threads: int = 1
    runs: int = 30
    warmup: int = 3
    kernels: str = "exact"
    cache: dict[str, MeasuredLatency] = field(default_factory=dict)

    def cached(self, plan: CompressionPlan) -> MeasuredLatency | None:
        return self.cache.get(plan_key(self.adapter, plan))

    def measure(self, plan: CompressionPlan, model: nn.Module | None = None, compress: Any = None) -> MeasuredLatency:
        """Median latency of `plan`'s exported model (`model`, or `compress(plan)` when not given)."""
        key = plan_key(self.adapter, plan)
        if key in self.cache:
            return self.cache[key]
        if model is None:
            model = compress(plan)
        with tempfile.TemporaryDirectory() as tmp:
            info = export_onnx(self.adapter, model, Path(tmp) / "candidate.onnx",
                               kernels=self.kernels)  # type: ignore[arg-type]
            sess = session(info.path, self.threads)
            feed = fixed_shape_feed(self.adapter, self.sample, self.batch, self.seq)
            times = time_round_robin({"candidate": sess}, feed, self.runs, self.warmup)["candidate"]
        s = Spread.of(times)
        result = MeasuredLatency(s.median, s.iqr, s.n, self.batch, self.seq, self.threads, self.kernels,
                                 info.file_bytes)
        self.cache[key] = result
        return result
