"""Noise-robust sampling of the calibration micro-benchmarks: what is timed, how often, in which order, and
within which wall-clock budget.

A *bench* is one ONNX graph (one weight set, built and loaded once) whose dynamic token axis serves several
*cells* (one feed each: every M of a linear's (K, N), every seq of an attention shape, ...). Benches are
measured a chunk at a time, and within a chunk every cell is timed in *passes*: a pass times each cell once
(`runs` back-to-back runs, their median), the order rotating from pass to pass, so a burst of other load hits
a different cell first each time and every cell of the chunk alike. Then:

* a cell's value is the median of its pass medians (not the minimum: one lucky pass is not the kernel);
* a whole pass that ran off the others (the median over the chunk's cells of pass / cell median further than
  `pass_tol` from 1: a burst of another process, a frequency step) is measured again, and so is a single
  cell's pass further than `outlier_sds` robust standard deviations (and `outlier_rel`) from its median;
* the noise decides the repeats: a cell gets further passes until the standard error of its median
  (1.2533 x 1.4826 MAD / sqrt(passes), relative) is below `target_rel_se`, up to `max_passes`;
* the per-call overhead and the per-node cost are measured in every chunk, on graphs of 1, 4 and 16 one-float
  Adds timed with the chunk's cells, and fitted together (run = call + copies x node): the two are then
  identified from the same graphs at the same moments, and each cell has its chunk's overhead subtracted
  (`CellStats.kernel_us`), where the overhead used to be measured once, at the start, on another graph (see
  docs/ARCHITECTURE.md, "Hardware profiles"). A chunk's overhead is the running median over it and its
  `OVERHEAD_WINDOW - 1` nearest chunks (`smooth_overheads`): the per-chunk intercepts from three tiny graphs
  spanned 1.2-1.4x their median ((max - min) / median) in two quiet calibrations (2026-12-02), far more than the
  machine drifts in seconds, and subtracted from an 8-copy run of 2 µs kernels every 1 µs is 6% of the kernel.

The budget is explicit: `plan_seconds` prices the cell count x passes x runs before anything runs, and a
deadline guards the rest (each chunk gets the share of the time left that its planned cost is of the cost
left; re-measurements and extra passes happen only within that share, and the runs per pass shrink to
`min_runs` when a chunk is behind).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from slimformer.hardware_profiles import microbench as mb

OVERHEAD_COPIES = (1, 4, 16)
OVERHEAD_RUNS = 100  # runs per pass of each overhead graph (~10-20 µs each): its fit is subtracted from every cell
OVERHEAD_WINDOW = 5  # chunks in the running median of the per-call overhead (smooth_overheads)
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class RepeatPolicy:
    """How many passes and runs a cell gets (see the module docstring)."""

    min_passes: int = 3
    max_passes: int = 6
    target_rel_se: float = 0.01
    outlier_sds: float = 4.0
    outlier_rel: float = 0.05
    pass_tol: float = 0.03
    max_remeasure: int = 2  # re-measurements of outlier passes per chunk (whole passes) and per cell
    pass_s: float = 0.01  # time per cell per pass (runs = pass_s / run time, clamped)
    min_runs: int = 3
    max_runs: int = 40
    chunk: int = 7  # benches (sessions) alive and interleaved at once

    def runs(self, run_us: float, share_s: float) -> int:
        """Runs per pass of a cell whose run takes `run_us`, given `share_s` seconds per pass."""
        return int(min(self.max_runs, max(self.min_runs, share_s * 1e6 / max(run_us, 1.0))))


@dataclass(frozen=True)
class Bench:
    """One graph and its cells: `feeds[key]` builds the input of cell `key`; `est_us[key]` guesses one run's
    time (for the plan only); the graph holds `copies` kernel instances."""

    label: str
    build: Callable[[], onnx.ModelProto]
    feeds: dict[Hashable, Callable[[], Feed]]
    est_us: dict[Hashable, float]
    copies: int
    weight_bytes: float = 0.0


@dataclass(frozen=True)
class CellStats:
    """One cell: median run time over its kept passes (µs per run, nothing subtracted) and how it was got."""

    run_us: float
    passes: tuple[float, ...]
    rel_sd: float  # robust relative spread of the kept pass medians (1.4826 MAD / median)
    rel_iqr: float  # median relative IQR of the runs inside a pass
    runs: int
    remeasured: int
    copies: int
    call_us: float = 0.0  # the per-call overhead fitted in this cell's chunk (subtract this, not a global one)

    @property
    def kernel_us(self) -> float:
        """Time of one kernel copy: (run - its chunk's per-call overhead) / copies (not clipped)."""
        return (self.run_us - self.call_us) / self.copies


@dataclass(frozen=True)
class OverheadFit:
    """run = call_us + copies x node_us of the one-float Add graphs, per chunk; the medians over chunks."""

    call_us: float
    node_us: float
    call_spread: float  # (max - min) / median of the per-chunk call overheads: drift during calibration
    chunks: int


@dataclass
class SamplingReport:
    """What sampling did: cells, passes measured, outlier passes re-measured, extra passes, seconds."""

    cells: int = 0
    passes: int = 0
    remeasured_passes: int = 0
    extra_passes: int = 0
    behind_chunks: int = 0
    seconds: float = 0.0
    planned_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def setup_seconds(bench: Bench) -> float:
    """A guess of building the graph and loading the session (weights generated ~200 MB/s, load ~15 ms)."""
    return 0.015 + bench.copies * bench.weight_bytes / 200e6


def plan_seconds(benches: list[Bench], policy: RepeatPolicy) -> float:
    """The planned wall time of `benches`: setup, warm-up and `min_passes` passes of every cell (runs per pass
    from the guessed run time), plus the overhead graphs in every chunk and Python's ~30 µs per run."""
    total = 0.0
    for b in benches:
        total += setup_seconds(b)
        for est in b.est_us.values():
            r = policy.runs(est, policy.pass_s)
            total += (3 + policy.min_passes * r) * (est + 30.0) * 1e-6
    chunks = -(-len(benches) // max(policy.chunk, 1))
    total += chunks * policy.min_passes * len(OVERHEAD_COPIES) * OVERHEAD_RUNS * 40e-6
    return total


def smooth_overheads(values: list[float], window: int = OVERHEAD_WINDOW) -> list[float]:
    """Running median of the per-chunk call overheads over `window` chunks centred on each (clipped at the ends):
    tracks drift over tens of seconds, not one chunk's estimation noise."""
    half = max(window, 1) // 2
    return [float(np.median(values[max(0, i - half):i + half + 1])) for i in range(len(values))]


def _robust(v: np.ndarray) -> tuple[float, float]:
    med = float(np.median(v))
    return med, 1.4826 * float(np.median(np.abs(v - med)))


def _outliers(v: np.ndarray, p: RepeatPolicy) -> np.ndarray:
    med, sd = _robust(v)
    return np.abs(v - med) > max(p.outlier_sds * sd, p.outlier_rel * med)


class _Chunk:
    """The sessions of a chunk and their cells' pass medians."""

    def __init__(self, sessions: list[tuple[object, Feed, str]], now: Callable[[], float]) -> None:
        self.sessions, self.now = sessions, now
        self.vals: list[list[float]] = [[] for _ in sessions]
        self.iqrs: list[list[float]] = [[] for _ in sessions]
        self.runs = [1] * len(sessions)
        self.remeasured = [0] * len(sessions)

    def time(self, i: int) -> float:
        sess, feed, _ = self.sessions[i]
        ts = np.array(mb.run_times_us(sess, feed, self.runs[i], self.now))
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        self.iqrs[i].append(float((q3 - q1) / med) if med > 0 else 0.0)
        return float(med)

    def one_pass(self, cells: list[int], rotation: int) -> list[float]:
        order = cells[rotation % len(cells):] + cells[:rotation % len(cells)] if cells else []
        if rotation % 2:  # and alternate the direction, so neighbours do not always follow each other
            order.reverse()
        return [self._record(i) for i in order]

    def _record(self, i: int) -> float:
        v = self.time(i)
        self.vals[i].append(v)
        return v


def measure(benches: list[Bench], threads: int, policy: RepeatPolicy, deadline: float,
            progress: Callable[[int, str], None] | None = None
            ) -> tuple[dict[Hashable, CellStats], OverheadFit, SamplingReport]:
    """Time every cell of `benches` (see the module docstring); `deadline` is a `time.perf_counter()` value
    by which the measurements should end. Returns the cells by key, the overhead fit and a report."""
    now = mb.clock(threads)
    t0 = time.perf_counter()
    rep = SamplingReport(planned_s=plan_seconds(benches, policy))
    tiny = []
    for c in OVERHEAD_COPIES:
        proto, feed = mb.tiny_graph(c)
        tiny.append((mb.session(proto, threads), feed, f"overhead x{c}"))
    left_cost = [plan_seconds(benches[i:], policy) for i in range(len(benches) + 1)]
    out: dict[Hashable, CellStats] = {}
    fits: list[tuple[float, float]] = []
    chunk_keys: list[list[Hashable]] = []
    for start in range(0, len(benches), max(policy.chunk, 1)):
        chunk = benches[start:start + max(policy.chunk, 1)]
        c0 = time.perf_counter()
        share = max(deadline - c0, 0.0) * (left_cost[start] - left_cost[start + len(chunk)]) / \
            max(left_cost[start], 1e-9)
        sessions, keys, copies = list(tiny), [None] * len(tiny), [0] * len(tiny)
        for b in chunk:
            sess = mb.session(b.build(), threads)
            for key, make in b.feeds.items():
                sessions.append((sess, make(), f"{b.label} {key}"))
                keys.append(key)
                copies.append(b.copies)
        ch = _Chunk(sessions, now)
        cells = list(range(len(sessions)))
        probe = []
        for i in cells:  # warm-up, and one timed run to plan the runs per pass
            sess, feed, _ = sessions[i]
            sess.run(None, feed)
            sess.run(None, feed)
            probe.append(mb.run_times_us(sess, feed, 1, now)[0])
        avail = share - (time.perf_counter() - c0)
        per_cell = min(policy.pass_s, max(avail, 0.0) / (policy.min_passes * len(cells)))
        if per_cell < policy.pass_s:
            rep.behind_chunks += 1
        ch.runs = [policy.runs(p, per_cell if i >= len(tiny) else policy.pass_s) for i, p in enumerate(probe)]
        ch.runs[:len(tiny)] = [OVERHEAD_RUNS] * len(tiny)

        def in_time(c0: float = c0, share: float = share) -> bool:
            return time.perf_counter() - c0 < share

        for p in range(policy.min_passes):
            ch.one_pass(cells, p)
            rep.passes += 1
        _remeasure_passes(ch, cells, policy, rep, in_time)
        _refine_cells(ch, cells, policy, rep, in_time)
        ys = np.array([float(np.median(ch.vals[i])) for i in range(len(tiny))])
        slope, icept = np.polyfit(np.array(OVERHEAD_COPIES, float), ys, 1)
        fits.append((float(icept), float(slope)))
        chunk_keys.append([keys[i] for i in cells[len(tiny):]])
        for i in cells[len(tiny):]:
            v = np.array(ch.vals[i])
            kept = v[~_outliers(v, policy)] if len(v) >= 3 else v
            med, sd = _robust(kept)
            out[keys[i]] = CellStats(med, tuple(float(x) for x in kept), sd / med if med > 0 else 0.0,
                                     float(np.median(ch.iqrs[i])), ch.runs[i], ch.remeasured[i], copies[i],
                                     float(icept))
            rep.cells += 1
        if progress is not None:
            progress(len(cells) - len(tiny), chunk[-1].label)
    for keys_c, call_c in zip(chunk_keys, smooth_overheads([f[0] for f in fits]), strict=True):
        for key in keys_c:
            out[key] = replace(out[key], call_us=call_c)
    calls = np.array([f[0] for f in fits]) if fits else np.zeros(1)
    nodes = np.array([f[1] for f in fits]) if fits else np.zeros(1)
    call = float(np.median(calls))
    spread = float((calls.max() - calls.min()) / call) if call > 0 else 0.0
    rep.seconds = time.perf_counter() - t0
    return out, OverheadFit(call, float(np.median(nodes)), spread, len(fits)), rep


def _remeasure_passes(ch: _Chunk, cells: list[int], p: RepeatPolicy, rep: SamplingReport,
                      in_time: Callable[[], bool]) -> None:
    """Measure again every pass whose cells ran, as a whole, off their medians by more than `pass_tol`."""
    if len(cells) < 3:
        return
    for _ in range(p.max_remeasure):
        meds = [float(np.median(ch.vals[i])) for i in cells]
        n = min(len(ch.vals[i]) for i in cells)
        factors = [float(np.median([ch.vals[i][k] / m for i, m in zip(cells, meds, strict=True) if m > 0]))
                   for k in range(n)]
        bad = [k for k, f in enumerate(factors) if abs(f - 1.0) > p.pass_tol]
        if not bad or not in_time():
            return
        for k in bad:
            for i in cells:
                ch.vals[i][k] = ch.time(i)
                ch.remeasured[i] += 1
            rep.remeasured_passes += 1


def _refine_cells(ch: _Chunk, cells: list[int], p: RepeatPolicy, rep: SamplingReport,
                  in_time: Callable[[], bool]) -> None:
    """Outlier passes of single cells are measured again, and noisy cells get passes until the standard
    error of their median is below `target_rel_se` (up to `max_passes`), while the chunk is in time."""
    rotation = p.min_passes
    while in_time():
        todo = []
        for i in cells:
            v = np.array(ch.vals[i])
            out = _outliers(v, p)
            if out.any() and ch.remeasured[i] < p.max_remeasure:
                ch.vals[i] = [x for x, o in zip(ch.vals[i], out, strict=True) if not o]
                ch.remeasured[i] += int(out.sum())
                todo.append(i)
                continue
            med, sd = _robust(v)
            if len(v) < p.max_passes and med > 0 and 1.2533 * sd / med / np.sqrt(len(v)) > p.target_rel_se:
                todo.append(i)
        if not todo:
            return
        ch.one_pass(todo, rotation)
        rotation += 1
        rep.extra_passes += 1
