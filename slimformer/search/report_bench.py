"""Measured latency of the best Pareto plans (`slimformer report RUN --bench N`), typed, as bench.json stores it.

The api exports each plan's recipe to ONNX and benchmarks it with `slimformer.api.bench` (export/bench.py:
round-robin against the fp32 export, at the search's batch x seq); this module keeps what the report shows:
measured beside predicted latency and the ratio to the roofline estimate of the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimformer.export.bench import FP32, TARGET, BenchResult
from slimformer.fileio import read_json, write_json

BENCH_FILE = "bench.json"


@dataclass(frozen=True)
class MeasuredPlan:
    """One Pareto plan's exported ONNX model timed in onnxruntime, next to what the search predicted."""

    trial: int
    recipe: str  # relative to the run directory
    predicted_ms: float  # the search's latency objective for this plan (its latency source)
    roofline_ms: float  # the roofline estimate of the plan (profile peak rate and bandwidth): a lower-bound model
    measured_ms: float  # median of the timed runs
    measured_q1_ms: float
    measured_q3_ms: float
    runs: int
    fp32_ms: float  # the uncompressed model's fp32 export, timed in the same rounds
    ratio_to_fp32: float  # median of the per-round ratios target / fp32
    file_bytes: int  # model.onnx on disk
    fidelity: dict[str, float]  # ONNX outputs vs the fp32 ONNX teacher on held-out data

    @property
    def over_predicted(self) -> float:
        """measured / predicted (1.0 = the prediction was exact)."""
        return self.measured_ms / self.predicted_ms if self.predicted_ms > 0 else float("nan")

    @property
    def over_roofline(self) -> float:
        """measured / roofline estimate (how far the real kernels are from the roofline)."""
        return self.measured_ms / self.roofline_ms if self.roofline_ms > 0 else float("nan")

    @classmethod
    def of(cls, trial: int, recipe: str, predicted_ms: float, roofline_ms: float, result: BenchResult
           ) -> MeasuredPlan:
        """The plan's row from a one-shape `BenchResult` of its recipe."""
        b, s = result.batches[0], result.seqs[0]
        target, fp32 = result.model_named(TARGET), result.model_named(FP32)
        at = target.at(b, s)
        return cls(trial, recipe, predicted_ms, roofline_ms, at.ms.median, at.ms.q1, at.ms.q3, at.ms.n,
                   fp32.at(b, s).ms.median, at.ratio_to_fp32.median, target.file_bytes, dict(target.fidelity))


@dataclass(frozen=True)
class FrontBench:
    """bench.json: how the plans were timed (shape, threads, kernels, machine) and one row per plan."""

    batch: int
    seq: int
    threads: int
    kernels: str
    cpu: str
    onnxruntime: str
    date: str
    plans: list[MeasuredPlan]
    loadavg: list[float] = field(default_factory=list)  # 1/5/15-minute load average when the timing began
    cpus: int = 0  # logical CPUs of the machine (to read the load average against)

    @property
    def busy(self) -> bool:
        """The machine had more runnable work than half its CPUs when timing began (timings inflated)."""
        return bool(self.loadavg) and self.cpus > 0 and self.loadavg[0] > 0.5 * self.cpus

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "plans"},
                "plans": [asdict(p) for p in self.plans]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FrontBench:
        return cls(d["batch"], d["seq"], d["threads"], d["kernels"], d["cpu"], d["onnxruntime"], d["date"],
                   [MeasuredPlan(**p) for p in d["plans"]], list(d.get("loadavg", [])), int(d.get("cpus", 0)))

    def of_trial(self, trial: int) -> MeasuredPlan | None:
        return next((p for p in self.plans if p.trial == trial), None)


def read_front_bench(run_dir: Path) -> FrontBench | None:
    """The run's bench.json, or None when `report --bench` has not run (or the file is unreadable)."""
    try:
        raw = read_json(run_dir / BENCH_FILE, None)
        return None if not raw else FrontBench.from_json(raw)
    except (ValueError, KeyError, TypeError):  # unreadable or another version's: the report goes without it
        return None


def write_front_bench(run_dir: Path, bench: FrontBench) -> None:
    write_json(run_dir / BENCH_FILE, bench.to_json())
