"""Deployment benchmark: a compressed ONNX model against fp32 and onnxruntime's dynamic int8 baselines.

`bench_models` builds, in one process with the same inputs and the same intra-op thread count:

  fp32                  `export_fp32` of the uncompressed model (the teacher);
  int8-dynamic-tensor   `onnxruntime.quantization.quantize_dynamic(fp32, per_channel=False, QInt8)`;
  int8-dynamic-channel  the same with `per_channel=True`;
  int8-optimized-channel  opt-in (`optimized_baseline`): the teacher exported with eager attention, fused by
                        `onnxruntime.transformers.optimizer` (Attention, SkipLayerNormalization, BiasGelu...),
                        then quantised like int8-dynamic-channel: the strongest int8 ORT's own tools build;
  target                the compressed model's ONNX export (or a given .onnx file).

For each model it records the file size, the resident weight bytes of a default CPU session
(`resident_weight_bytes`), latency at every batch x sequence length and fidelity to the fp32 ONNX teacher
on held-out data. Latency inputs are real held-out texts tokenised and padded/truncated to exactly `seq`
tokens. After warm-up, the models are timed round-robin (one run of each per round, the starting model
rotating from round to round) so machine noise hits all of them alike; each model gets `runs` timed
runs. A latency ratio A/B is computed per round (A's time over B's time in that round) and summarised
by the median (and quartiles) of those per-round ratios, which is far more robust on a shared machine
than the ratio of two medians.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.errors import ConfigError
from slimformer.export.onnx_export import export_fp32, onnx_outputs, resident_weight_bytes, session
from slimformer.models.base import Batch, ModelAdapter

FP32 = "fp32"
INT8_TENSOR = "int8-dynamic-tensor"
INT8_CHANNEL = "int8-dynamic-channel"
TARGET = "target"
INT8_OPTIMIZED = "int8-optimized-channel"
BASELINES = (FP32, INT8_TENSOR, INT8_CHANNEL)


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a sample (latencies in ms, or per-round ratios)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        a = np.asarray(values, dtype=np.float64)
        q1, med, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), int(a.size))


@dataclass(frozen=True)
class Latency:
    """One model at one input shape: ms per run, and its per-round ratio to the fp32 model."""

    batch: int
    seq: int
    ms: Spread
    ratio_to_fp32: Spread


@dataclass(frozen=True)
class ModelBench:
    name: str
    path: str
    file_bytes: int
    resident_bytes: int
    fidelity: dict[str, float]
    latency: list[Latency]

    def at(self, batch: int, seq: int) -> Latency:
        return next(x for x in self.latency if x.batch == batch and x.seq == seq)


@dataclass(frozen=True)
class RatioRow:
    """target / baseline latency at one shape: median and quartiles of the per-round ratios."""

    baseline: str
    batch: int
    seq: int
    ratio: Spread


@dataclass(frozen=True)
class BenchResult:
    target: str
    model: str
    models: list[ModelBench]
    target_ratios: list[RatioRow]
    threads: int
    batches: list[int]
    seqs: list[int]
    runs: int
    warmup: int
    data: str
    samples: int
    cpu: str
    onnxruntime: str
    date: str
    extra: dict[str, Any] = field(default_factory=dict)

    def model_named(self, name: str) -> ModelBench:
        return next(m for m in self.models if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        def spread(s: Spread) -> dict[str, float]:
            return {"median": s.median, "q1": s.q1, "q3": s.q3, "iqr": s.iqr, "n": s.n}

        d = asdict(self)
        d["models"] = [{**{k: v for k, v in asdict(m).items() if k != "latency"},
                        "latency": [{"batch": x.batch, "seq": x.seq, "ms": spread(x.ms),
                                     "ratio_to_fp32": spread(x.ratio_to_fp32)} for x in m.latency]}
                       for m in self.models]
        d["target_ratios"] = [{"baseline": r.baseline, "batch": r.batch, "seq": r.seq, "ratio": spread(r.ratio)}
                              for r in self.target_ratios]
        return d

    def format(self) -> str:
        fp32 = self.model_named(FP32)
        metric = next(iter(fp32.fidelity), "cosine")
        kern = f", kernels: {self.extra['kernels']}" if "kernels" in self.extra else ""
        lines = [f"target {self.target}{kern} (model {self.model}); {self.threads} thread(s), {self.runs} runs "
                 f"round-robin, onnxruntime {self.onnxruntime}, {self.cpu}", "",
                 f"{'model':22s} {'file MB':>9s} {'resident MB':>12s} {'% fp32':>7s} {metric:>9s}"]
        for m in self.models:
            fid = m.fidelity.get(metric, float("nan"))
            lines.append(f"{m.name:22s} {m.file_bytes / 1e6:9.2f} {m.resident_bytes / 1e6:12.2f} "
                         f"{100 * m.resident_bytes / fp32.resident_bytes:6.1f}% {fid:9.4f}")
        lines += ["", "latency ms, median [IQR]; x fp32 = median of per-round ratios"]
        head = f"{'batch x seq':12s}" + "".join(f" {m.name:>30s}" for m in self.models)
        lines.append(head)
        for b in self.batches:
            for s in self.seqs:
                row = f"{f'{b} x {s}':12s}"
                for m in self.models:
                    x = m.at(b, s)
                    cell = f"{x.ms.median:.2f} [{x.ms.iqr:.2f}] x{x.ratio_to_fp32.median:.2f}"
                    row += f" {cell:>30s}"
                lines.append(row)
        lines += ["", "target / baseline (median of per-round ratios [q1, q3]):"]
        for r in self.target_ratios:
            lines.append(f"  {r.baseline:22s} {r.batch:>4d} x {r.seq:<4d} {r.ratio.median:6.3f} "
                         f"[{r.ratio.q1:.3f}, {r.ratio.q3:.3f}]")
        return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quantize_int8_dynamic(fp32_path: Path | str, out_path: Path | str, per_channel: bool) -> Path:
    """onnxruntime's dynamic int8 quantisation (weights QInt8, activations quantised at run time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint
    try:
        quantize_dynamic(str(fp32_path), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(prev)
    return Path(out_path)


def optimized_int8_dynamic(adapter: ModelAdapter, work_dir: Path) -> Path:
    """The opt-in stronger baseline: `adapter.model` exported with eager attention (the pattern onnxruntime's
    transformers optimizer recognises; our SDPA export is not fused by it), fused by
    `optimize_model(model_type=adapter.ort_optimizer_type)` (Attention, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization), then `quantize_dynamic` per channel."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    if adapter.ort_optimizer_type is None:
        raise ConfigError(f"--optimized-baseline: onnxruntime's transformers optimizer has no model type for "
                          f"{adapter.family} models; run bench without it")
    work_dir = Path(work_dir).resolve()
    with adapter.eager_attention(adapter.model):
        eager = export_fp32(adapter, work_dir / "fp32-eager.onnx").path
    layer = adapter.layers[0]
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:  # in work_dir: its symbolic shape inference may leave a temp model (and external data) in the cwd
        with contextlib.chdir(work_dir):
            fused = optimize_model(str(eager), model_type=adapter.ort_optimizer_type,
                                   num_heads=layer.num_heads, hidden_size=layer.num_heads * layer.head_dim, opt_level=0)
        fused.save_model_to_file(str(work_dir / "fp32-optimized.onnx"))
    finally:
        logging.getLogger().setLevel(prev)
    return quantize_int8_dynamic(work_dir / "fp32-optimized.onnx", work_dir / f"{INT8_OPTIMIZED}.onnx", True)


def heldout_samples(adapter: ModelAdapter, data: str, samples: int) -> tuple[Sequence[Any], Any]:
    """Held-out inputs (texts, or images and labels for an image family) - never the search split."""
    held = adapter.heldout_samples(data, samples)
    return held.inputs, held.labels


def fixed_length_feed(adapter: ModelAdapter, samples: Sequence[Any], batch: int, seq: int) -> dict[str, np.ndarray]:
    """`batch` held-out samples (cycled if too few), texts padded/truncated to exactly `seq` tokens."""
    return adapter.fixed_length_feed(samples, batch, seq)


def _fidelity(adapter: ModelAdapter, teacher: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Fidelity of ONNX outputs to the fp32 ONNX teacher's: the family's metrics that need no labels."""
    import torch

    from slimformer.models.metrics import encoder_metrics, top1_agreement

    t = torch.from_numpy(teacher.astype(np.float32))
    o = torch.from_numpy(out.astype(np.float32))
    if adapter.kind == "encoder":
        return encoder_metrics(t, o)
    return {"agreement": top1_agreement(t, o)}


def time_round_robin(sessions: dict[str, Any], feed: dict[str, np.ndarray], runs: int, warmup: int,
                     clock: Callable[[], float] = time.perf_counter, repeat: int = 1) -> dict[str, list[float]]:
    """ms per run of each session: `warmup` untimed rounds, then `runs` rounds, one turn of each session
    per round with the starting session rotating (used by the bench, the measured latency objective and
    profile validation, which passes a per-thread CPU clock).

    A turn runs the session `repeat` times back to back and times the last run: with repeat >= 2 the
    model's weights are in cache, as for a deployed model serving one request after another. Round-robin
    over many small models otherwise times every run from a cache the other models evicted (measured:
    the Fashion-MNIST ViT runs 23% slower timed among 34 models than among 2)."""
    names = list(sessions)
    feeds = {n: {i.name: feed[i.name] for i in s.get_inputs()} for n, s in sessions.items()}
    # the deployed result only (an encoder's sentence_embedding, not its token embeddings too): what a user runs
    first = {n: [s.get_outputs()[0].name] for n, s in sessions.items()}
    for _ in range(warmup):
        for n in names:
            sessions[n].run(first[n], feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for k in range(len(names)):
            n = names[(r + k) % len(names)]  # rotate who goes first
            for _ in range(repeat - 1):
                sessions[n].run(first[n], feeds[n])
            t0 = clock()
            sessions[n].run(first[n], feeds[n])
            times[n].append(1e3 * (clock() - t0))
    return times


# -- the benchmark ---------------------------------------------------------------------------------
def bench_models(reference: ModelAdapter, target_onnx: Path | str, *, target_name: str | None = None,
                 data: str = "fortunes", samples: int = 256, threads: int = 1, seqs: Sequence[int] = (64, 128),
                 batches: Sequence[int] = (1, 32), runs: int = 30, warmup: int = 3,
                 work_dir: Path | str | None = None, log: Any = None, optimized_baseline: bool = False
                 ) -> BenchResult:
    """Benchmark `target_onnx` against fp32 and dynamic-int8 exports of `reference` (the uncompressed model),
    and with `optimized_baseline` also against ORT's optimised dynamic int8 (`optimized_int8_dynamic`).

    `reference.model` must be the uncompressed teacher. Writes the baselines to `work_dir` (a temporary
    folder when None). Fidelity is measured on `samples` held-out inputs against the fp32 ONNX outputs.
    """
    import onnxruntime as ort

    if runs < 1 or warmup < 0 or threads < 1 or samples < 2 or not seqs or not batches:
        raise ConfigError("bench needs runs >= 1, threads >= 1, samples >= 2 and at least one batch and seq")
    if any(int(x) < 1 for x in (*seqs, *batches)):
        raise ConfigError("batch sizes and sequence lengths must be >= 1")
    target_onnx = Path(target_onnx)
    if not target_onnx.is_file():
        raise ConfigError(f"{target_onnx} does not exist")
    say = log or (lambda _msg: None)
    seqs = reference.latency_seqs(seqs)
    batches = [int(b) for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(work_dir) if work_dir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        say("exporting fp32 and dynamic int8 baselines")
        paths = {FP32: export_fp32(reference, wd / "fp32.onnx").path}
        paths[INT8_TENSOR] = quantize_int8_dynamic(paths[FP32], wd / "int8-dynamic-tensor.onnx", False)
        paths[INT8_CHANNEL] = quantize_int8_dynamic(paths[FP32], wd / "int8-dynamic-channel.onnx", True)
        if optimized_baseline:
            say("exporting the optimised int8 baseline (eager attention, ORT transformers optimizer)")
            paths[INT8_OPTIMIZED] = optimized_int8_dynamic(reference, wd)
        paths[TARGET] = target_onnx
        sessions = {n: session(p, threads) for n, p in paths.items()}

        say("fidelity on held-out data")
        x, labels = heldout_samples(reference, data, samples)
        fid_batches: list[Batch] = reference.make_batches(x, 32, labels)
        outs = {n: onnx_outputs(s, fid_batches) for n, s in sessions.items()}
        fidelity = {n: _fidelity(reference, outs[FP32], o) for n, o in outs.items()}

        timings: dict[tuple[int, int], dict[str, list[float]]] = {}
        for b in batches:
            for s in seqs:
                say(f"latency batch {b} x seq {s}")
                feed = fixed_length_feed(reference, x, b, s)
                timings[(b, s)] = time_round_robin(sessions, feed, runs, warmup)

        def ratios(a: str, base: str, shape: tuple[int, int]) -> Spread:
            ta, tb = np.asarray(timings[shape][a]), np.asarray(timings[shape][base])
            return Spread.of(ta / tb)

        models = []
        for n, p in paths.items():
            lat = [Latency(b, s, Spread.of(timings[(b, s)][n]), ratios(n, FP32, (b, s)))
                   for b in batches for s in seqs]
            models.append(ModelBench(n, str(p) if work_dir is not None or n == TARGET else p.name,
                                     p.stat().st_size, resident_weight_bytes(p), fidelity[n], lat))
        target_ratios = [RatioRow(base, b, s, ratios(TARGET, base, (b, s)))
                         for base in [n for n in paths if n != TARGET] for b in batches for s in seqs]
    return BenchResult(target=target_name or str(target_onnx), model=reference.model_id, models=models,
                       target_ratios=target_ratios, threads=threads, batches=batches, seqs=seqs, runs=runs,
                       warmup=warmup, data=data, samples=len(x), cpu=cpu_model(), onnxruntime=ort.__version__,
                       date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
