"""Whole-model timing (not kernel micro-benchmarks, which are microbench.py): export each plan, time all
the exported models round-robin with the bench protocol.

Used by calibration (reference models for the whole-graph residual) and validation (held-out plans).
Inputs are held-out samples padded/truncated to exactly `seq` tokens (the adapter's `fixed_length_feed`);
after warm-up every model runs once per round, the starting model rotating, so machine noise hits all
of them alike; the result is each model's median ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from slimformer.compression.plan import CompressionPlan
from slimformer.models.base import ModelAdapter

WARM_REPEAT = 4  # runs per turn in a round-robin; the last is timed (warm cache; 2 was not always enough)
WARM_MS = 5.0  # ... and at least this many ms of runs per turn, so a sub-millisecond model is warm too
MAX_REPEAT = 64


def warm_repeat(model_ms: float) -> int:
    """Runs per turn for models of about `model_ms`: WARM_REPEAT, or more so that a turn runs >= WARM_MS.

    Measured (2026-12-02, AMD EPYC Zen 3, 1 thread): among 64 round-robin ViT models (0.4 ms each), the fp32 one
    timed after 4 runs per turn was 4% slower than in a rotation of 4 models, and matched it after 16 runs; the
    calibration's reference timing rotates 15 models, validation 64, so the residual's level disagreed with the
    validation by 5-7% at ViT 1x17 (MiniLM, 35 ms a run, is as warm as it gets after a few runs)."""
    return int(max(WARM_REPEAT, min(MAX_REPEAT, np.ceil(WARM_MS / max(model_ms, 1e-3)))))


def export_plans(adapter: ModelAdapter, plans: Mapping[str, CompressionPlan], work_dir: Path,
                 log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Apply and export each plan to `work_dir/<name>.onnx` (RTN rounding: latency ignores the values);
    a file exported earlier from the same plan (`<name>.plan` holds its repr) is reused.

    torch runs single-threaded meanwhile: on a shared machine a multi-threaded SVD can be 30x slower."""
    from slimformer.threads import using_threads

    with using_threads(1):
        return _export_plans(adapter, plans, work_dir, log)


def _export_plans(adapter: ModelAdapter, plans: Mapping[str, CompressionPlan], work_dir: Path,
                  log: Callable[[str], None] | None) -> dict[str, Path]:
    from slimformer.compression.apply import DecompositionCache, apply_plan
    from slimformer.compression.plan import UnitSpec
    from slimformer.export import export_onnx

    work_dir.mkdir(parents=True, exist_ok=True)
    cache = DecompositionCache()
    paths = {}
    for name, plan in plans.items():
        out, stamp = work_dir / f"{name}.onnx", work_dir / f"{name}.plan"
        if out.is_file() and stamp.is_file() and stamp.read_text() == repr(plan):
            paths[name] = out  # exported earlier from the same plan (a kept --work-dir)
            continue
        rtn = CompressionPlan(units={u: UnitSpec(s.rank, s.sparsity, s.pattern, s.bits, s.group_size, "rtn",
                                                 s.kernel, smooth=s.smooth) for u, s in plan.units.items()},
                              layers=plan.layers, sharing=plan.sharing)
        t0 = time.perf_counter()
        model = apply_plan(adapter, rtn, cache, rtn_fallback=True)  # smoothed units: unit factors (same graph)
        paths[name] = export_onnx(adapter, model, out).path
        stamp.write_text(repr(plan))
        if log:
            log(f"exported {name} in {time.perf_counter() - t0:.1f} s")
    return paths


def time_round_robin(paths: Mapping[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int,
                     warmup: int = 2, repeat: int = WARM_REPEAT) -> dict[str, list[float]]:
    """ms per run of every model, timed round-robin (one turn each per round, start rotating; a turn
    times the last of `repeat` back-to-back runs, so weights are warm as in the micro-benchmarks and in
    deployment), on `microbench.clock(threads)` (this thread's CPU time at 1 thread, wall time otherwise)."""
    from slimformer.export import session
    from slimformer.export.bench import time_round_robin as round_robin
    from slimformer.hardware_profiles.microbench import clock

    sessions = {n: session(p, threads) for n, p in paths.items()}
    return round_robin(sessions, feed, runs, warmup, clock=clock(threads), repeat=repeat)


def input_feed(adapter: ModelAdapter, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Held-out inputs of exactly batch x seq (text) or batch images, as the bench builds them."""
    samples = adapter.heldout_samples("fortunes", max(8, batch)).inputs
    return adapter.fixed_length_feed(samples, batch, seq)


def measure_plans(adapter: ModelAdapter, plans: Mapping[str, CompressionPlan], batch: int, seq: int, threads: int,
                  work_dir: Path, runs: int = 15) -> dict[str, float]:
    """Median ms of each plan's exported model at batch x seq, all timed round-robin."""
    return {n: float(np.median(v)) for n, v in measure_plan_passes(adapter, plans, batch, seq, threads, work_dir,
                                                                    runs, passes=1).items()}


def measure_plan_passes(adapter: ModelAdapter, plans: Mapping[str, CompressionPlan], batch: int, seq: int,
                        threads: int, work_dir: Path, runs: int = 15, passes: int = 3,
                        repeat: int = WARM_REPEAT) -> dict[str, list[float]]:
    """Each plan's median ms in each of `passes` round-robin passes of about runs / passes rounds (at least 5):
    a drift or a burst during one pass shows as that pass's spread instead of moving every median alike; callers
    take the median of the pass medians. A turn runs a model `repeat` times and times the last (`warm_repeat`)."""
    from slimformer.export import session
    from slimformer.export.bench import time_round_robin as round_robin
    from slimformer.hardware_profiles.microbench import clock

    paths = {n: p for n, p in ((n, work_dir / f"{n}.onnx") for n in plans) if p.is_file()}
    missing = {n: plan for n, plan in plans.items() if n not in paths}
    if missing:
        paths.update(export_plans(adapter, missing, work_dir))
    sessions = {n: session(paths[n], threads) for n in plans}  # loaded once for all passes
    feed = input_feed(adapter, batch, seq)
    per = runs if passes <= 1 else max(5, -(-runs // passes))
    out: dict[str, list[float]] = {n: [] for n in plans}
    for k in range(max(1, passes)):
        times = round_robin(sessions, feed, per, 2 if k == 0 else 1, clock=clock(threads), repeat=repeat)
        for n, t in times.items():
            out[n].append(float(np.median(t)))
    return out
