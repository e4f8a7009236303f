"""`slimformer calibrate`: measure this device's onnxruntime kernels and fit the latency model.

1. Kernel micro-benchmarks (microbench.py), sampled by sampling.py (interleaved passes, per-cell medians,
   outlier passes re-measured, repeats set by the noise, within a wall-clock budget): every linear kernel
   class the exporter emits, over M = batch x seq in `m_values` and (K, N) over `dims` (model widths and the
   rank grid), each fitted per M by non-negative least squares on relative error (t = c0 + c1*K*N + c2*K +
   c3*N); embedding kernels by rows x width; the attention core over heads x seq x head_dim;
   residual-add+LayerNorm, GELU, Add by elements. Rates: best fp32 GEMM rate (and per class), best Add
   bandwidth; the per-call overhead and the per-node cost from the one-float Add graphs (sampling.py).
2. Reference models (`references`, references.py): fp32 and uniform int8 / int4-g32 exports of each and
   `samples` random mixed plans (seeded apart from validation's), timed round-robin in interleaved passes at a
   few shapes (model_timing.py); the whole-graph residuals of their family (glue, dispatch, cache effects) are
   fitted on them (residual_fit.py: one over all shapes, and one per shape, shape_residual.py), and so is the
   FLOPs proxy's constant. Validation (validate.py) uses other random plans.
Noise: the relative IQR of the runs inside a pass and the robust spread of a cell's pass medians. The load
average is recorded. Before a profile is returned it is checked against physical bounds
(`HardwareProfile.physical_problems`): a disturbed calibration is an error, never a profile.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from slimformer.errors import ConfigError
from slimformer.export.kernels import KernelChoice
from slimformer.hardware_profiles import microbench as mb
from slimformer.hardware_profiles.machine import cpu_info, default_name
from slimformer.hardware_profiles.predict import attention_features, kernel_class
from slimformer.hardware_profiles.profile import (
    MIN_NODE_US,
    CalibrationInfo,
    Fit,
    HardwareProfile,
    KernelTable,
    LatencyModel,
    Noise,
)
from slimformer.hardware_profiles.references import MINILM, VIT_FMNIST
from slimformer.hardware_profiles.residual_fit import fit_residuals
from slimformer.hardware_profiles.sampling import Bench, CellStats, RepeatPolicy, measure, plan_seconds
from slimformer.progress import progress_bar

LINEAR_CLASSES: tuple[KernelChoice, ...] = (
    KernelChoice("matmul", 32),
    KernelChoice("dequant_gemm", 8),
    KernelChoice("matmulnbits", 8, 32, 32), KernelChoice("matmulnbits", 8, 128, 128),
    KernelChoice("matmulnbits", 4, 16, 16), KernelChoice("matmulnbits", 4, 32, 32),
    KernelChoice("matmulnbits", 4, 64, 64), KernelChoice("matmulnbits", 4, 128, 128),
    KernelChoice("matmulnbits", 4, 256, 256),
    KernelChoice("dynamic_int8", 8),  # units with kernel: int8 (DynamicQuantizeMatMul; one class for 8 and 4 bits)
)
EMBEDDING_CLASSES: tuple[KernelChoice, ...] = (
    KernelChoice("gather", 32), KernelChoice("fp16_gather", 16), KernelChoice("gather_dequant", 8),
    KernelChoice("gather_block_quantized", 4, 32, 32), KernelChoice("gather_block_quantized", 4, 64, 64),
    KernelChoice("gather_block_quantized", 4, 128, 128), KernelChoice("gather_block_quantized", 8, 32, 32),
    KernelChoice("gather_block_quantized", 8, 128, 128),
)


@dataclass(frozen=True)
class CalibrationGrid:
    """What `calibrate` measures and within how long: `full()` is the default (designed for <= 10 minutes on a
    quiet 2-core machine at 1 thread), `quick()` a short run (<= 3 minutes) for steering a search; tests pass
    tiny ones. `seconds` is the wall-clock budget of the whole calibration, `micro_share` the part of it the
    micro-benchmarks are planned into (sampling.py: their repeats adapt to it; the reference models take
    the rest), `policy` how many passes and runs a cell gets, `samples` how many sampled plans of each reference
    model the shape-local residual is fitted on besides the reference plans."""

    m_values: tuple[int, ...]
    dims: tuple[int, ...]
    linear: tuple[KernelChoice, ...] = LINEAR_CLASSES
    embedding: tuple[KernelChoice, ...] = EMBEDDING_CLASSES
    heads: tuple[int, ...] = (1, 2, 4, 6, 8, 12)
    seqs: tuple[int, ...] = (16, 32, 64, 128, 256)
    head_dims: tuple[int, ...] = (24, 64)
    elem_rows: tuple[int, ...] = (1, 16, 64, 128, 512)
    elem_widths: tuple[int, ...] = (96, 384, 1536)
    references: tuple[str, ...] = (MINILM, VIT_FMNIST)
    reference_shapes: dict[str, tuple[tuple[int, int], ...]] | None = None
    policy: RepeatPolicy = RepeatPolicy()
    seconds: float = 540.0
    micro_share: float = 0.6
    quick_mode: bool = False
    samples: int = 8

    @classmethod
    def full(cls) -> CalibrationGrid:
        return cls(m_values=(1, 8, 16, 32, 64, 128, 512), dims=(16, 48, 96, 192, 384, 768, 1536))

    @classmethod
    def quick(cls) -> CalibrationGrid:
        """The quick run: every shape the reference models and the rank grid need at fewer points (M 1, 16,
        64, 128, 512; K/N 16 to 1536 without 192 and 768), the kernel classes the exporter's default blocks
        use, both reference models at their deployment shapes, 2-4 passes per cell."""
        return cls(m_values=(1, 16, 64, 128, 512), dims=(16, 48, 96, 384, 1536), heads=(1, 4, 12),
                   seqs=(16, 64, 128), head_dims=(24, 64), elem_rows=(1, 64, 512), elem_widths=(96, 384, 1536),
                   linear=tuple(c for c in LINEAR_CLASSES if c.block in (None, 32, 128)),
                   embedding=EMBEDDING_CLASSES[:3],
                   reference_shapes={MINILM: ((1, 32), (1, 128)), VIT_FMNIST: ((1, 17), (8, 17))},
                   policy=RepeatPolicy(min_passes=2, max_passes=4, pass_s=0.006, max_runs=25, max_remeasure=1),
                   seconds=170.0, micro_share=0.5, quick_mode=True, samples=5)

    def cells(self) -> int:
        """Micro-benchmark cells (one median each): linear M x K x N per class, embeddings, attention, elementwise."""
        return (len(self.linear) * len(self.m_values) * len(self.dims) ** 2
                + len(self.embedding) * 2 * len(sorted({1, *self.m_values}))
                + 2 * len(self.heads) * len(self.seqs) * len(self.head_dims)  # decomposed and fused attention
                + len(mb.ELEMENTWISE) * len(self.elem_rows) * len(self.elem_widths))

    def benches(self) -> list[Bench]:
        """Every micro-benchmark graph with its cells (keys: ('linear', class index, m, k, n), ('embedding',
        class index, dim, m), ('attention' | 'mha', h, s, d), (op, rows, width))."""
        out: list[Bench] = []
        for c, choice in enumerate(self.linear):
            cls = kernel_class(choice)
            for k in self.dims:
                for n in self.dims:
                    wbytes = k * n * choice.bits / 8
                    cp = _copies(wbytes)
                    est = {("linear", c, m, k, n): cp * max(2 * m * k * n / 50e3, wbytes / 5e3, 5.0)
                           for m in self.m_values}
                    out.append(Bench(f"{cls} {k}x{n}", partial(_graph, mb.linear_graph, choice, 1, k, n, cp),
                                     {key: partial(mb.linear_feed, key[2], k) for key in est}, est, cp,
                                     k * n * (4.0 if choice.kind == "matmul" else 1.0)))
        rows_m = sorted({1, *self.m_values})
        for c, choice in enumerate(self.embedding):
            for dim in (96, 384):
                est = {("embedding", c, dim, m): 4 * (5.0 + m * dim / 2e3) for m in rows_m}
                out.append(Bench(f"{kernel_class(choice)} {dim}", partial(_graph, mb.embedding_graph, choice, 4096,
                                                                           dim, 1, 4),
                                 {key: partial(mb.embedding_feed, 4096, key[3]) for key in est}, est, 4, 4096 * dim))
        for d in self.head_dims:
            for h in self.heads:
                est = {("attention", h, s, d): 4 * (4 * h * s * s * d / 20e3 + 10) for s in self.seqs}
                out.append(Bench(f"attention h{h} d{d}", partial(_graph, mb.attention_graph, h, 1, d, 4),
                                 {key: partial(mb.attention_feed, h, key[2], d) for key in est}, est, 4))
                est = {("mha", h, s, d): 4 * (2 * h * s * s * d / 20e3 + 10) for s in self.seqs}
                out.append(Bench(f"mha h{h} d{d}", partial(_graph, mb.mha_graph, h, 1, d, 4),
                                 {key: partial(mb.mha_feed, h, key[2], d) for key in est}, est, 4))
        for op in mb.ELEMENTWISE:
            for w in self.elem_widths:
                est = {(op, r, w): 4 * (r * w / 200 + 5) for r in self.elem_rows}
                out.append(Bench(f"{op} x{w}", partial(_graph, mb.elementwise_graph, op, 1, w, 4),
                                 {key: partial(mb.elementwise_feed, op, key[1], w) for key in est}, est, 4))
        return out

    def plan_seconds(self) -> float:
        """Planned wall time of the micro-benchmarks at `policy` (sampling.plan_seconds)."""
        return plan_seconds(self.benches(), self.policy)


def _graph(make: Callable[..., tuple[Any, Any]], *args: Any) -> Any:
    return make(*args)[0]


BANDWIDTH_MIN_ELEMENTS = 16384  # an Add of at least 192 KB moved: its time is bytes, not overhead


def _copies(weight_bytes: float) -> int:
    return int(min(8, max(2, np.ceil(24e6 / max(weight_bytes, 1.0)))))


def fit_nnls(x: np.ndarray, t: np.ndarray, names: list[str], floor: float = 0.0) -> Fit:
    """Non-negative least squares on relative error (rows scaled by 1/t). With `floor`, the first feature
    (the constant "1") is at least `floor`: a known lower bound (one node's dispatch) that an unconstrained
    intercept can undershoot when per-element cost dominates every cell (it then fits 0 µs per node)."""
    w = 1.0 / np.maximum(t, 1e-9)
    coef, _ = nnls(x * w[:, None], (t - floor * x[:, 0]) * w)
    coef[0] += floor
    pred = x @ coef
    rmse = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Fit(features=names, coef=[float(c) for c in coef], rmse_rel=round(rmse, 4), n=int(len(t)))


class _Fitter:
    """Turns the sampled cells (run µs per cell) into the latency model's tables and fits."""

    def __init__(self, grid: CalibrationGrid, cells: dict[Hashable, CellStats]) -> None:
        self.grid, self.cells = grid, cells
        self.rates: dict[str, float] = {}

    def us(self, key: Hashable) -> float:
        """Kernel time per copy: (run - its chunk's per-call overhead) / copies (no clipping: physical_problems
        judges it)."""
        return self.cells[key].kernel_us

    def linear(self) -> tuple[dict[str, KernelTable], dict[str, float]]:
        g = self.grid
        tables: dict[str, KernelTable] = {}
        peaks: dict[str, float] = {}
        for c, choice in enumerate(g.linear):
            cls = kernel_class(choice)
            fits, grids = [], []
            for m in g.m_values:
                rows = [(1.0, k * n, k, n) for k in g.dims for n in g.dims]
                ts = [self.us(("linear", c, m, k, n)) for k in g.dims for n in g.dims]
                for (_, _, k, n), t in zip(rows, ts, strict=True):
                    if t > 0:
                        peaks[cls] = max(peaks.get(cls, 0.0), 2 * m * k * n / t / 1e3)  # GFLOP/s
                fits.append(fit_nnls(np.array(rows, float), np.array(ts), ["1", "K*N", "K", "N"]))
                grid = np.array(ts).reshape(len(g.dims), len(g.dims))
                grid = np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)  # more K or N: not faster
                grids.append([[round(float(v), 3) for v in row] for row in grid])
            for i in range(1, len(grids)):  # more tokens: not faster
                grids[i] = np.maximum(np.array(grids[i]), np.array(grids[i - 1])).tolist()
            tables[cls] = KernelTable(m_values=list(g.m_values), fits=fits, dims=list(g.dims), times=grids)
        return tables, {k: round(v, 2) for k, v in peaks.items()}

    def embedding(self) -> dict[str, Fit]:
        out = {}
        for c, choice in enumerate(self.grid.embedding):
            rows = [(1.0, m * dim) for dim in (96, 384) for m in sorted({1, *self.grid.m_values})]
            ts = [self.us(("embedding", c, dim, m)) for dim in (96, 384) for m in sorted({1, *self.grid.m_values})]
            out[kernel_class(choice)] = fit_nnls(np.array(rows, float), np.array(ts), ["1", "rows*width"])
        return out

    def attention(self, kind: str = "attention") -> Fit:
        """The attention core's fit: kind 'attention' (torch's decomposition) or 'mha' (MultiHeadAttention)."""
        g = self.grid
        keys = [(h, s, d) for d in g.head_dims for h in g.heads for s in g.seqs]
        rows = [attention_features(h, s, d) for h, s, d in keys]
        ts = [self.us((kind, h, s, d)) for h, s, d in keys]
        return fit_nnls(np.array(rows, float), np.array(ts), ["1", "BH*S*S*D", "BH*S*S", "BH*S*D"])

    def elementwise(self) -> dict[str, Fit]:
        g = self.grid
        out = {}
        for op in mb.ELEMENTWISE:
            rows, ts = [], []
            for r in g.elem_rows:
                for w in g.elem_widths:
                    t = self.us((op, r, w))
                    rows.append((1.0, r * w))
                    ts.append(t)
                    if op == "add" and r * w >= BANDWIDTH_MIN_ELEMENTS and t > 0:  # bytes-bound sizes only
                        self.rates["bandwidth"] = max(self.rates.get("bandwidth", 0.0), 12.0 * r * w / t / 1e3)
            out[op] = fit_nnls(np.array(rows, float), np.array(ts), ["1", "elements"], floor=MIN_NODE_US)
        return out


def calibrate(threads: int, grid: CalibrationGrid | None = None, name: str | None = None,
              progress: bool = True, work_dir: Path | None = None,
              log: Callable[[str], None] | None = None) -> HardwareProfile:
    """Run the micro-benchmarks (and reference models) at `threads` intra-op threads; the fitted profile.
    ConfigError, naming the field, when the result is unphysical (HardwareProfile.physical_problems)."""
    import tempfile

    import onnxruntime as ort

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    g = grid or CalibrationGrid.full()
    benches = g.benches()
    planned = plan_seconds(benches, g.policy)
    n_ref = sum(len(g.reference_shapes.get(r, ())) if g.reference_shapes else (2 if r == VIT_FMNIST else 4)
                for r in g.references)
    if log is not None:
        log(f"calibrate: {len(benches)} graphs, {g.cells()} cells x {g.policy.min_passes}-{g.policy.max_passes} "
            f"passes, micro-benchmarks planned {planned:.0f} s of a {g.micro_share * g.seconds:.0f} s share; "
            f"{n_ref} reference shapes; budget {g.seconds:.0f} s")
    bar = progress_bar(g.cells() + n_ref, desc="calibrate", disable=not progress, file=sys.stderr, unit="cell")

    def step(k: int, label: str) -> None:
        bar.update(k)
        bar.set_postfix_str(label[:40], refresh=False)

    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    cells, over, rep = measure(benches, threads, g.policy, t0 + g.micro_share * g.seconds, step)
    fit = _Fitter(g, cells)
    tables, peaks = fit.linear()
    lm = LatencyModel(linear=tables, embedding=fit.embedding(), attention=fit.attention(),
                      attention_mha=fit.attention("mha"),
                      elementwise=fit.elementwise(), call_overhead_us=round(over.call_us, 3))
    cpu, isa = cpu_info()
    iq = np.array([c.rel_iqr for c in cells.values()])
    sd = np.array([c.rel_sd for c in cells.values()])
    profile = HardwareProfile(
        name=name or default_name(cpu, isa, threads, f"ort{'-'.join(ort.__version__.split('.')[:2])}"),
        cpu=cpu, cores=os.cpu_count() or 1, threads=threads, isa_flags=isa, runtime="onnxruntime",
        runtime_version=ort.__version__, peak_gflops_fp32=peaks.get("matmul", 1.0),
        mem_bandwidth_gbs=round(fit.rates.get("bandwidth", 1.0), 2),
        per_op_overhead_us=round(over.node_us, 4),
        created=date.today(), providers=mb.providers(), caches=cache_sizes(), peak_gflops=peaks, latency_model=lm,
        noise=Noise(median_rel_iqr=round(float(np.median(iq)), 4), p95_rel_iqr=round(float(np.percentile(iq, 95)), 4),
                    repeats=len(iq), loadavg=load0, median_pass_rel_sd=round(float(np.median(sd)), 4),
                    p95_pass_rel_sd=round(float(np.percentile(sd, 95)), 4),
                    remeasured_passes=rep.remeasured_passes, call_overhead_drift=round(over.call_spread, 4)),
    )
    profile.check_physical("calibration")  # before minutes of reference models, and before anything is written
    with tempfile.TemporaryDirectory() as tmp:
        points = fit_residuals(lm, profile, g.references, threads, Path(work_dir or tmp), step, g.reference_shapes,
                               samples=g.samples)
    bar.close()
    seconds = time.perf_counter() - t0
    flag = " --quick" if g.quick_mode else ""
    profile = profile.model_copy(update={"latency_model": lm, "calibration": CalibrationInfo(
        command=f"slimformer calibrate{flag} --runtime onnxruntime --threads {threads}", seconds=round(seconds, 1),
        clock="thread_cpu" if threads == 1 else "wall", quick=g.quick_mode, budget_seconds=g.seconds,
        planned_seconds=round(planned, 1), micro_seconds=round(rep.seconds, 1),
        measurements=sum(len(c.passes) for c in cells.values()) + len(points), loadavg_before=load0,
        loadavg_after=[round(x, 2) for x in os.getloadavg()])})
    profile.notes = (f"Made by `slimformer calibrate{flag}` on this machine ({cpu}, {os.cpu_count()} logical CPUs, "
                     f"onnxruntime {ort.__version__}, {threads} intra-op thread(s)) in {seconds:.0f} s; "
                     f"load average before {load0}. Micro-benchmarks of the exporter's own kernels "
                     f"({g.cells()} cells, median of {g.policy.min_passes}-{g.policy.max_passes} interleaved passes), "
                     f"timed on the {'thread CPU' if threads == 1 else 'wall'} clock; "
                     f"whole-graph residual fitted on {', '.join(g.references) or 'no reference models'} "
                     f"({g.samples} sampled plans each besides the reference plans).")
    profile.check_physical("calibration")
    return profile


def cache_sizes() -> dict[str, int]:
    """L1d/L2/L3 sizes in bytes from sysfs (Linux; empty elsewhere)."""
    out: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1024, "M": 1024**2}.get(size[-1], 1)
        out[f"l{level}{'d' if kind == 'Data' else ''}"] = int(size.rstrip("KM")) * mult
    return out
