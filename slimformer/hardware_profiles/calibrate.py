"""`slimformer calibrate`: measure this device's onnxruntime kernels and fit the latency model.

1. Kernel micro-benchmarks (microbench.py): every linear kernel class the exporter emits, over M = batch x seq
   in `m_values` and (K, N) over `dims` (model widths and the rank grid), each fitted per M by
   non-negative least squares on relative error (t = c0 + c1*K*N + c2*K + c3*N); embedding kernels by
   rows x width; the attention core over heads x seq x head_dim; residual-add+LayerNorm, GELU, Add by
   elements. Rates: best fp32 GEMM rate (and per class), best Add bandwidth, tiny-op time.
2. Reference models (`references`, references.py): fp32 and uniform int8 / int4-g32 exports of each, timed
   round-robin at a few shapes (model_timing.py); the whole-graph residual of their family (glue, dispatch,
   cache effects) is fitted on them (residual_fit.py), and so is the FLOPs proxy's constant. Validation
   (validate.py) uses other, random plans.
Noise: the relative IQR of the repeated runs of every benchmark. The load average is recorded.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from slimformer.errors import ConfigError
from slimformer.export.kernels import KernelChoice
from slimformer.hardware_profiles import microbench as mb
from slimformer.hardware_profiles.machine import cpu_info, default_name
from slimformer.hardware_profiles.predict import attention_features, kernel_class
from slimformer.hardware_profiles.profile import (
    CalibrationInfo,
    Fit,
    HardwareProfile,
    KernelTable,
    LatencyModel,
    Noise,
)
from slimformer.hardware_profiles.references import MINILM, VIT_FMNIST
from slimformer.hardware_profiles.residual_fit import fit_residuals

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
    """What `calibrate` measures; `full()` is the default, `quick()` a short run, tests pass tiny ones."""

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
    runs: int = 12
    budget_s: float = 0.25  # per benchmark, after warm-up
    # fast kernels (a few µs, what a ViT at 17 tokens runs) get more runs, up to max_runs within small_budget_s:
    # 12 runs of a 3 µs kernel left each table cell ~5% noise and two calibrations' ViT errors correlated 0.27
    max_runs: int = 100
    small_budget_s: float = 0.02
    passes: int = 2  # linear grid passes (the fastest is kept); quick() and tests use 1

    @classmethod
    def full(cls) -> CalibrationGrid:
        return cls(m_values=(1, 8, 16, 32, 64, 128, 512), dims=(16, 48, 96, 192, 384, 768, 1536))

    @classmethod
    def quick(cls) -> CalibrationGrid:
        return cls(m_values=(1, 32, 128), dims=(96, 384, 1536), heads=(1, 4, 12), seqs=(16, 128),
                   head_dims=(64,), elem_rows=(1, 128), elem_widths=(384, 1536), references=(MINILM,),
                   runs=6, budget_s=0.1, max_runs=6, passes=1,
                   linear=tuple(c for c in LINEAR_CLASSES if c.block in (None, 32, 128)),
                   embedding=EMBEDDING_CLASSES[:3])


OVERHEAD_REPEATS = 5
BANDWIDTH_MIN_ELEMENTS = 16384  # an Add of at least 192 KB moved: its time is bytes, not overhead


def _copies(weight_bytes: float) -> int:
    return int(min(8, max(2, np.ceil(24e6 / max(weight_bytes, 1.0)))))


def _runs(grid: CalibrationGrid, est_us: float, copies: int) -> int:
    """Timed runs of one benchmark: up to `runs` within `budget_s`, and up to `max_runs` within `small_budget_s`
    (so a slow kernel gets few runs, a fast one many, and neither costs more than its budget)."""
    per_run = max(est_us * copies, 1.0)
    base = min(grid.runs, max(4, grid.budget_s * 1e6 / per_run))
    return int(max(base, min(grid.max_runs, grid.small_budget_s * 1e6 / per_run)))


def fit_nnls(x: np.ndarray, t: np.ndarray, names: list[str]) -> Fit:
    """Non-negative least squares on relative error (rows scaled by 1/t)."""
    w = 1.0 / np.maximum(t, 1e-9)
    coef, _ = nnls(x * w[:, None], t * w)
    pred = x @ coef
    rmse = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Fit(features=names, coef=[float(c) for c in coef], rmse_rel=round(rmse, 4), n=int(len(t)))


class _Run:
    """One calibration: benchmark list, progress, collected timings."""

    def __init__(self, grid: CalibrationGrid, threads: int, progress: Callable[[int, str], None]) -> None:
        self.grid, self.threads, self.progress = grid, threads, progress
        self.iqrs: list[float] = []
        self.rates: dict[str, float] = {}
        self.n = 0
        # the fixed cost of a session run, subtracted from every benchmark: the least of 5 measurements (other
        # tenants' load only adds; one measurement taken in a burst read 9.1 us instead of ~6 and zeroed the
        # small elementwise benchmarks, giving a 4.6 TB/s "bandwidth")
        self.overhead = min(mb.call_overhead_us(threads) for _ in range(OVERHEAD_REPEATS))

    def time(self, proto_feed: tuple, copies: int, est_us: float, label: str) -> float:
        proto, feed = proto_feed
        t = mb.time_graph(proto, feed, copies, self.threads, _runs(self.grid, est_us, copies),
                          call_overhead_us=self.overhead)
        self.iqrs.append(t.rel_iqr)
        self.n += 1
        self.progress(1, label)
        return max(t.median_us, 1e-3)

    def linear(self) -> tuple[dict[str, KernelTable], dict[str, float]]:
        """Every linear class over M x K x N, class by class, in `passes` passes; a cell's time is the fastest
        pass's median (other tenants' load only ever slows a pass down, and on this shared VM it shifted whole
        classes by 10-16% between two calibrations)."""
        g = self.grid
        timed: dict[tuple[int, int, int, int], float] = {}
        for _ in range(g.passes):
            for c, choice in enumerate(g.linear):
                cls = kernel_class(choice)
                for m in g.m_values:
                    for k in g.dims:
                        for n in g.dims:
                            wbytes = k * n * choice.bits / 8
                            est = max(2 * m * k * n / 50e3, wbytes / 5e3, 5.0)  # 50 GFLOP/s, 5 GB/s guess
                            t = self.time(mb.linear_graph(choice, m, k, n, _copies(wbytes)), _copies(wbytes), est,
                                          f"{cls} {m}x{k}x{n}")
                            timed[c, m, k, n] = min(t, timed.get((c, m, k, n), t))
        tables: dict[str, KernelTable] = {}
        peaks: dict[str, float] = {}
        for c, choice in enumerate(g.linear):
            cls = kernel_class(choice)
            fits, grids = [], []
            for m in g.m_values:
                rows = [(1.0, k * n, k, n) for k in g.dims for n in g.dims]
                ts = [timed[c, m, k, n] for k in g.dims for n in g.dims]
                for (_, _, k, n), t in zip(rows, ts, strict=True):
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
        for choice in self.grid.embedding:
            cls = kernel_class(choice)
            rows, ts = [], []
            for dim in (96, 384):
                for m in sorted({1, *self.grid.m_values}):
                    t = self.time(mb.embedding_graph(choice, 4096, dim, m, 4), 4, 10.0, f"{cls} {m}x{dim}")
                    rows.append((1.0, m * dim))
                    ts.append(t)
            out[cls] = fit_nnls(np.array(rows, float), np.array(ts), ["1", "rows*width"])
        return out

    def attention(self) -> Fit:
        g = self.grid
        rows, ts = [], []
        for d in g.head_dims:
            for h in g.heads:
                for s in g.seqs:
                    est = 4 * h * s * s * d / 20e3 + 10
                    t = self.time(mb.attention_graph(h, s, d, 4), 4, est, f"attention h{h} s{s} d{d}")
                    rows.append(attention_features(h, s, d))
                    ts.append(t)
        return fit_nnls(np.array(rows, float), np.array(ts), ["1", "BH*S*S*D", "BH*S*S", "BH*S*D"])

    def elementwise(self) -> dict[str, Fit]:
        g = self.grid
        out = {}
        for op in mb.ELEMENTWISE:
            rows, ts = [], []
            for r in g.elem_rows:
                for w in g.elem_widths:
                    t = self.time(mb.elementwise_graph(op, r, w, 4), 4, r * w / 200 + 5, f"{op} {r}x{w}")
                    rows.append((1.0, r * w))
                    ts.append(t)
                    if op == "add" and r * w >= BANDWIDTH_MIN_ELEMENTS:  # bytes-bound sizes only
                        self.rates["bandwidth"] = max(self.rates.get("bandwidth", 0.0), 12.0 * r * w / t / 1e3)
            out[op] = fit_nnls(np.array(rows, float), np.array(ts), ["1", "elements"])
            if op == "add":  # the tiny-op time: the fit's constant (one benchmark alone is at the noise level)
                self.rates["tiny"] = out[op].coef[0] if out[op].coef[0] > 0 else min(ts)
        return out


def calibrate(threads: int, grid: CalibrationGrid | None = None, name: str | None = None,
              progress: bool = True, work_dir: Path | None = None) -> HardwareProfile:
    """Run the micro-benchmarks (and reference models) at `threads` intra-op threads; the fitted profile."""
    import tempfile

    import onnxruntime as ort
    from tqdm.auto import tqdm

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    g = grid or CalibrationGrid.full()
    n_lin = g.passes * len(g.linear) * len(g.m_values) * len(g.dims) ** 2
    n_emb = len(g.embedding) * 2 * len(sorted({1, *g.m_values}))
    n_att = len(g.heads) * len(g.seqs) * len(g.head_dims)
    n_elw = len(mb.ELEMENTWISE) * len(g.elem_rows) * len(g.elem_widths)
    n_ref = sum(len(g.reference_shapes.get(r, ())) if g.reference_shapes else (2 if r == VIT_FMNIST else 4)
                for r in g.references)
    bar = tqdm(total=n_lin + n_emb + n_att + n_elw + n_ref, desc="calibrate", disable=not progress,
               file=sys.stderr, unit="bench")

    def step(k: int, label: str) -> None:
        bar.update(k)
        bar.set_postfix_str(label[:40], refresh=False)

    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    run = _Run(g, threads, step)
    tables, peaks = run.linear()
    lm = LatencyModel(linear=tables, embedding=run.embedding(), attention=run.attention(),
                      elementwise=run.elementwise(), call_overhead_us=round(run.overhead, 2))
    cpu, isa = cpu_info()
    iq = np.array(run.iqrs)
    profile = HardwareProfile(
        name=name or default_name(cpu, isa, threads, f"ort{'-'.join(ort.__version__.split('.')[:2])}"),
        cpu=cpu, cores=os.cpu_count() or 1, threads=threads, isa_flags=isa, runtime="onnxruntime",
        runtime_version=ort.__version__, peak_gflops_fp32=peaks.get("matmul", 1.0),
        mem_bandwidth_gbs=round(run.rates.get("bandwidth", 1.0), 2),
        per_op_overhead_us=round(run.rates.get("tiny", 0), 3),
        created=date.today(), providers=mb.providers(), caches=cache_sizes(), peak_gflops=peaks, latency_model=lm,
        noise=Noise(median_rel_iqr=round(float(np.median(iq)), 4), p95_rel_iqr=round(float(np.percentile(iq, 95)), 4),
                    repeats=len(iq), loadavg=load0),
    )
    with tempfile.TemporaryDirectory() as tmp:
        points = fit_residuals(lm, profile, g.references, threads, Path(work_dir or tmp), step, g.reference_shapes)
    bar.close()
    seconds = time.perf_counter() - t0
    profile = profile.model_copy(update={"latency_model": lm, "calibration": CalibrationInfo(
        command=f"slimformer calibrate --runtime onnxruntime --threads {threads}", seconds=round(seconds, 1),
        clock="thread_cpu" if threads == 1 else "wall",
        measurements=run.n + len(points), loadavg_before=load0, loadavg_after=[round(x, 2) for x in os.getloadavg()])})
    profile.notes = (f"Made by `slimformer calibrate` on this machine ({cpu}, {os.cpu_count()} logical CPUs, "
                     f"onnxruntime {ort.__version__}, {threads} intra-op thread(s)) in {seconds:.0f} s; "
                     f"load average before {load0}. Micro-benchmarks of the exporter's own kernels, "
                     f"timed on the {'thread CPU' if threads == 1 else 'wall'} clock; "
                     f"whole-graph residual fitted on {', '.join(g.references) or 'no reference models'}.")
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
