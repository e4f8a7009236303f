"""Deployable ONNX export: a compressed torch model -> `onnx/model.onnx` whose compression is physical and
runs in a plain `onnxruntime.InferenceSession` (CPUExecutionProvider, default session options).

Pipeline and the reasons behind it:

1. Trace. The model is wrapped so the graph computes exactly `adapter.export_outputs(model, batch)` (HF
   encoders: input_ids, attention_mask [, token_type_ids] -> `sentence_embedding` (what
   SentenceTransformer.encode returns: mean/cls/max pooling, L2-normalised when modules.json has a
   Normalize step) and `last_hidden_state` (token embeddings, what sentence-transformers' ONNX backend and
   Optimum read); classifiers -> `logits`; timm: pixels -> `output`), with metadata_props (pooling,
   normalize, max_length, slimformer_version, recipe_sha256) and the dynamic batch (and sequence) axes its
   family names (`ModelAdapter.dynamic_axes`), traced on the family's `trace_batch`, and
   exported with the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): the dynamo exporter
   needs `onnxscript`, which is not installed. That exporter stops at opset 20, so the graph is traced at
   opset min(opset, 20) and, when `opset` > 20, converted with `onnx.version_converter` (20 -> 21 only
   widens types of the ops a Transformer uses). Default opset 21: `DequantizeLinear` with `block_size`
   and INT4 tensors need it; ONNX Runtime 1.32 runs opsets up to 25. The TorchScript exporter leaves
   the traced modules in training mode in torch 2.14 (dropout on!), so the train/eval flags are restored.
2. Lower. Each compressed matrix's fp32 initializer is found by content (see `graph`) and replaced by
   a kernel that stores its int codes (see `kernels` for layouts and exactness):
     int4 linear  -> MatMulNBits(bits=4), blocks re-cut to a power of two when the group is not one;
     int8 linear  -> one scale per row: DequantizeLinear(axis 0) + Gemm (fastest exact int8 form measured);
                     groups: MatMulNBits(bits=8) (DequantizeLinear blocked + Gemm if no power-of-two block);
     int8/int4 table -> GatherBlockQuantized (int8 per-row table: Gather + Cast + Mul);
     fp16 -> fp16 initializer + Cast (linear: ORT folds it to fp32 at load; table: stays fp16);
   low-rank factors are two ordinary linears, pruned heads/neurons are just smaller matrices, shared
   modules export once (the exporter aliases identical tensors; content de-duplication afterwards makes
   sure every tensor is stored once). Sparse weights stay dense (ORT's CPU kernels are dense): a sparse
   plan's file is larger than the safetensors accounting (bitmask / 2:4 storage); the `onnx` deploy
   target of `plan_memory` prices it dense and bounds the whole file (`graph_overhead_bytes`).
3. Write atomically (temp file in the target folder, then rename).

Why these kernels (ORT 1.32, AMD EPYC, 2 shared vCPUs, 1 intra-op thread, CPU ms per run of the whole
all-MiniLM-L6-v2 graph, every linear in the format; batch 32x89 tokens | batch 1x29; median of 10|100
runs interleaved across variants on a loaded machine, so +-10%):
  fp32 930 | 10.1;  int8 per-row: DQ+Gemm 940 | 12.5, MatMulNBits(8) 1037 | 27.6;
  int8 g32: MatMulNBits(8) 1026 | 35.7, blocked DQ+Gemm 1054 | 36.8;  int4 g32 MatMulNBits 892 | 10.7;
  int4 per-row (re-blocked 128/256) 873 | 10.7.  accuracy_level=4 variants are 10-30% faster but quantise
  activations (cosine 0.9996-0.9987, max abs error 2e-2 to 4e-2 on MiniLM embeddings), so they are
  not used. `DequantizeLinear -> MatMul` is rewritten by ORT into exactly that inexact kernel at load,
  which rules out the plain QDQ form for weights feeding a MatMul.
Per unit, `kernel: int8` lowers that unit to kernels.dynamic_int8, with the unit's own SmoothQuant factors when
its spec has `smooth` (compression/smoothing.py) and unsmoothed otherwise: what the torch model computes for it,
so the search scores the deployed numerics; `kernels='fast'` overrides every unit and trades
exactness for ORT's int8 GEMM (kernels.dynamic_int8): MiniLM, 2 threads, batch 1,
round-robin vs ORT per-channel dynamic int8 on the Quickstart 15% recipe: exact x1.6-2.7, MatMulNBits
accuracy_level=4 x1.4-1.8 (cosine 0.9805), DynamicQuantizeMatMul x0.87-0.96 (cosine 0.9730 unsmoothed,
0.9778 with SmoothQuant alpha 0.7-0.85; exact 0.9809). Details in docs/ARCHITECTURE.md.

`resident_weight_bytes` sums the initializers of the graph ORT actually runs (its optimised graph,
after constant folding and fusions), i.e. what a session keeps: fp16 linear weights count as fp32
there, int codes as stored. It was validated against the RSS growth of creating an InferenceSession.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slimformer.compression.modules import SlimLinear, exact_compute
from slimformer.errors import ConfigError
from slimformer.export import graph as G
from slimformer.export import kernels as K
from slimformer.export.attention import cancel_layout_pairs, drop_untyped_value_info, fused_attention
from slimformer.fileio import atomic_write
from slimformer.models.base import Batch, ModelAdapter
from slimformer.models.modalities import SAMPLE_TEXTS  # noqa: F401 - re-exported: the texts traced with

DEFAULT_OPSET = 21
TORCHSCRIPT_MAX_OPSET = 20
MIN_OPSET = 17


@dataclass(frozen=True)
class ExportInfo:
    """What was written: sizes, kernels and opsets of one exported model."""

    path: Path
    file_bytes: int
    initializer_bytes: dict[str, int]  # kind -> bytes: float32, float16, int4, int8, scales, int64, other
    n_matmulnbits: int
    n_int8: int  # int8 linear kernels (DequantizeLinear+Gemm or MatMulNBits bits=8)
    n_gather_quantized: int  # GatherBlockQuantized or int8 Gather+Cast+Mul tables
    opset: int
    domains: dict[str, int]
    kernels: dict[str, str] = field(default_factory=dict)  # compressed module -> kernel
    unconverted: tuple[str, ...] = ()  # compressed modules some node still reads as fp32
    # per-unit (each unit's kernel: exact or int8) | exact | fast (overrides: every unit exact / int8 + SmoothQuant)
    kernel_mode: str = K.PER_UNIT
    n_dynamic_int8: int = 0  # matrices on the int8 GEMM (int8-kernel units, or every int4/int8 one in fast mode)
    n_dynamic_int8_nodes: int = 0  # DynamicQuantizeMatMul nodes (q/k/v reading one input share one: fewer)

    @property
    def weight_bytes(self) -> int:
        return sum(self.initializer_bytes.values())


# -- tracing ---------------------------------------------------------------------------------------
class _OutputGraph(nn.Module):
    """Positional inputs -> `adapter.export_outputs(model, batch)`, so the graph includes pooling (and the
    normalisation of a sentence-transformers model) and, for encoders, the token embeddings."""

    def __init__(self, adapter: ModelAdapter, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.adapter, self.model, self.names = adapter, model, tuple(names)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adapter.export_outputs(self.model, Batch(dict(zip(self.names, args, strict=True))))


def sample_batch(adapter: ModelAdapter, sample_texts: Sequence[Any] | None = None) -> Batch:
    """A small batch to trace with: the given samples, else the family's own (two texts of different
    lengths, so padding is traced, or two blank images)."""
    if sample_texts is not None:
        return adapter.make_batches(list(sample_texts), len(sample_texts))[0]
    return adapter.trace_batch()


def trace_onnx(adapter: ModelAdapter, model: nn.Module, batch: Batch, opset: int, fused: bool = False
               ) -> onnx.ModelProto:
    """Export `adapter.export_outputs(model, .)` at `opset` (TorchScript exporter; converted above opset 20).
    fused: attention cores as onnxruntime's MultiHeadAttention (`export.attention`), else torch's own nodes."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (got {opset})")
    names = list(batch.inputs)
    device = next(model.parameters()).device
    args = tuple(batch.inputs[k].to(device) for k in names)
    dyn = adapter.dynamic_axes(batch)
    modes = {m: m.training for m in model.modules()}
    wrapper = _OutputGraph(adapter, model.eval(), names)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "traced.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad(), fused_attention(fused):
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, args, str(f), dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                                  input_names=names, output_names=list(adapter.export_output_names()), dynamic_axes=dyn,
                                  do_constant_folding=True)
        finally:
            for m, training in modes.items():  # the TorchScript exporter leaves modules in training mode
                m.train(training)
        proto = onnx.load(str(f))
    if fused:
        drop_untyped_value_info(proto.graph)
        cancel_layout_pairs(proto.graph)
    if opset > TORCHSCRIPT_MAX_OPSET:
        proto = onnx.version_converter.convert_version(proto, opset)
    return proto


# -- writing ---------------------------------------------------------------------------------------
def _set_opsets(proto: onnx.ModelProto, opset: int) -> None:
    domains = {n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    imports = {imp.domain: imp.version for imp in proto.opset_import if imp.domain not in ("", "ai.onnx")}
    imports = {d: v for d, v in imports.items() if d in domains}
    for d in domains:
        imports.setdefault(d, 1)
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("", opset))
    for d, v in sorted(imports.items()):
        proto.opset_import.append(onnx.helper.make_opsetid(d, v))


def _write_atomic(proto: onnx.ModelProto, path: Path) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(Path(path), proto.SerializeToString())


def _set_metadata(proto: onnx.ModelProto, adapter: ModelAdapter, extra: Mapping[str, str] | None) -> None:
    """metadata_props: how the outputs are made (the adapter's pooling/normalize/max_length), the slimformer
    version, and what the caller adds (the recipe's sha256)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("slimformer")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
        ver = "unknown"
    props = {"producer": "slimformer", "slimformer_version": ver, **adapter.export_metadata(), **(extra or {})}
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in props.items()})


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return int(onnx.numpy_helper.to_array(t).nbytes)


def initializer_kinds(proto: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes by kind: int4/int8 codes, scales of quantised kernels, float32, float16, int64..."""
    role: dict[str, str] = {}
    for n in proto.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            data = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
            scales = n.input[2]
            role[data] = f"int{bits}"
            role[scales] = "scales"
        elif n.op_type == "DequantizeLinear" or (n.op_type == "Gather" and n.name.endswith("/GatherScales")):
            role[n.input[1] if n.op_type == "DequantizeLinear" else n.input[0]] = "scales"
        elif n.op_type == "Mul" and n.name.endswith(("/GroupScale", "/SmoothWeight")):  # fast kernels
            role[n.input[1]] = "scales"
    out: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.name in role:
            kind = role[t.name]
        elif t.data_type == onnx.TensorProto.INT4:
            kind = "int4"
        else:
            kind = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                    onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT64: "int64"}.get(t.data_type, "other")
        out[kind] = out.get(kind, 0) + _tensor_bytes(t)
    return out


def _info(proto: onnx.ModelProto, path: Path, file_bytes: int, report: G.RewriteReport | None,
          kernel_mode: str = K.PER_UNIT) -> ExportInfo:
    counts = G.op_counts(proto)
    dtype = {t.name: t.data_type for t in proto.graph.initializer}
    int8 = onnx.TensorProto.INT8
    nbits8 = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits"
                 and any(a.name == "bits" and a.i == 8 for a in n.attribute))
    dq8 = sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear" and dtype.get(n.input[0]) == int8)
    gather8 = sum(1 for n in proto.graph.node if n.op_type == "Gather" and dtype.get(n.input[0]) == int8)
    gq = counts.get("GatherBlockQuantized", 0) + gather8
    domains = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    return ExportInfo(path=path, file_bytes=file_bytes, initializer_bytes=initializer_kinds(proto),
                      n_matmulnbits=counts.get("MatMulNBits", 0), n_int8=nbits8 + dq8, n_gather_quantized=gq,
                      opset=domains.get("ai.onnx", 0), domains=domains,
                      kernels=dict(report.kernels) if report else {},
                      unconverted=tuple(report.unconverted) if report else (), kernel_mode=kernel_mode,
                      n_dynamic_int8=sum(k.startswith("DynamicQuantizeMatMul") for k in report.kernels.values())
                      if report else 0, n_dynamic_int8_nodes=counts.get("DynamicQuantizeMatMul", 0))


# -- public API ------------------------------------------------------------------------------------
def input_abs_max(model: nn.Module, adapter: ModelAdapter, batches: Sequence[Batch]) -> dict[str, np.ndarray]:
    """max |input| per input feature of every compressed linear (module path -> (in_features,)), over
    `batches`: the activation statistics the fast kernels' SmoothQuant factors are computed from."""
    stats: dict[str, np.ndarray] = {}

    def hook(name: str) -> Any:
        def record(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().float()
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).cpu().numpy()
            stats[name] = np.maximum(stats[name], m) if name in stats else m
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in G.compressed_modules(model)
               if isinstance(mod, SlimLinear)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            for b in batches:
                adapter.output(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def export_onnx(adapter: ModelAdapter, model: nn.Module, path: Path | str, *, opset: int = DEFAULT_OPSET,
                sample_texts: Sequence[Any] | None = None, int8_kernel: G.Int8Kernel = "auto",
                kernels: G.KernelMode | None = None, calibration: Sequence[Batch] | None = None,
                metadata: Mapping[str, str] | None = None, fused: bool = True,
                fuse_projections: bool = True) -> ExportInfo:
    """Export a (compressed) model as ONNX with its compression physical (int4/int8 kernels).

    fused (default): attention cores as onnxruntime's MultiHeadAttention (`export.attention`; same outputs
    to float rounding); False: torch's own decomposition, as a plain `torch.onnx.export` writes it.
    fuse_projections (default): int8-GEMM linears reading one input (query/key/value) run as one
    DynamicQuantizeMatMul on their concatenated weights (identical outputs, same file and session bytes).

    sample_texts: inputs to trace with (texts for HF models, uint8 images for timm); the graph has
    dynamic batch/sequence axes either way. int8_kernel: 'auto' (DequantizeLinear+Gemm for one scale
    per row, MatMulNBits for groups), 'dequantize' or 'matmulnbits'. kernels: None (default: each unit's
    own kernel, `UnitSpec.kernel`: exact units as above, int8 units as DynamicQuantizeMatMul with their own
    SmoothQuant factors or none, as the torch model computes them) or an override of every unit: 'exact' (outputs equal
    the torch model's exact-kernel outputs to float rounding) or 'fast' (every int4/int8 linear an int8
    GEMM with activations quantised; SmoothQuant factors from `calibration` batches, or from the trace
    batch when None).
    """
    if kernels is not None and kernels not in K.KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {', '.join(K.KERNEL_MODES)} (got {kernels!r})")
    path = Path(path)
    batch = sample_batch(adapter, sample_texts)
    with exact_compute(model):  # trace plain MatMuls (lowered below per unit) and take fp32 statistics
        act_max = input_abs_max(model, adapter, list(calibration) if calibration else [batch]) \
            if kernels == "fast" else None
        proto = trace_onnx(adapter, model, batch, opset, fused=fused)
    report = G.rewrite(proto, model, int8_kernel=int8_kernel, mode=kernels, act_max=act_max,
                       fuse_projections=fuse_projections)
    if report.max_opset_needed > opset:
        raise ValueError(f"this plan's kernels need opset {report.max_opset_needed} (DequantizeLinear with "
                         f"block_size, int4 tensors, ReduceMax axes input); export with "
                         f"opset={report.max_opset_needed}")
    _set_opsets(proto, opset)
    proto.producer_name = "slimformer"
    _set_metadata(proto, adapter, metadata)
    onnx.checker.check_model(proto)
    size = _write_atomic(proto, path)
    return _info(proto, path, size, report, kernels or K.PER_UNIT)


def export_fp32(adapter: ModelAdapter, path: Path | str, *, opset: int = DEFAULT_OPSET,
                sample_texts: Sequence[Any] | None = None, fused: bool = False) -> ExportInfo:
    """Export the uncompressed reference model (the baseline a benchmark compares against): by default as a
    plain `torch.onnx.export` writes it (what users have today); fused=True lowers attention as `export_onnx`."""
    path = Path(path)
    proto = trace_onnx(adapter, adapter.model, sample_batch(adapter, sample_texts), opset, fused=fused)
    G.normalise(proto.graph)
    G.dedup_initializers(proto.graph)
    G.prune_initializers(proto.graph)
    _set_opsets(proto, opset)
    proto.producer_name = "slimformer"
    _set_metadata(proto, adapter, None)
    onnx.checker.check_model(proto)
    size = _write_atomic(proto, path)
    return _info(proto, path, size, None)


def graph_overhead_bytes(adapter: ModelAdapter) -> int:
    """Bytes of the fp32 ONNX export beyond the fp32 weights `plan_memory` counts (protobuf nodes and names,
    shape constants, buffers such as position ids): the graph term of the onnx deploy target
    (`compression.memory.set_deploy`). Exports the uncompressed model once to a temp file."""
    from slimformer.compression.memory import plan_memory
    from slimformer.compression.plan import CompressionPlan

    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(export_fp32(adapter, Path(tmp) / "fp32.onnx", fused=True).path))
    del proto.metadata_props[:]  # metadata (max_length...) varies with how the model was loaded: in the slack
    return max(0, proto.ByteSize() - plan_memory(adapter, CompressionPlan(), "safetensors").total_bytes)


def session(path: Path | str, threads: int | None = None) -> Any:
    """A plain CPU InferenceSession (default options; `threads` sets intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_outputs(path: Path | str | Any, batches: Sequence[Batch], threads: int | None = None) -> np.ndarray:
    """Run the exported model on adapter batches (the same inputs torch gets); its first output (the deployed
    result: sentence_embedding, logits, or `output` of older files) concatenated."""
    sess = path if hasattr(path, "run") else session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    first = [sess.get_outputs()[0].name]
    outs = []
    for b in batches:
        feed = {k: b.inputs[k].detach().cpu().numpy() for k in names}
        outs.append(sess.run(first, feed)[0])
    return np.concatenate(outs, axis=0)


def resident_weight_bytes(path: Path | str) -> int:
    """Bytes of all initializers as a default CPU session keeps them: the initializers of ONNX
    Runtime's optimised graph (after its constant folding and fusions)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    return sum(_tensor_bytes(t) for t in opt.graph.initializer)


_RSS_PROBE = """
import ctypes, gc, sys
import onnxruntime as ort
libc = ctypes.CDLL("libc.so.6")
def rss():
    gc.collect(); libc.malloc_trim(0)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
so.enable_cpu_mem_arena = False; so.enable_mem_pattern = False
keep, marks = [], [rss()]
for _ in range(int(sys.argv[2])):
    keep.append(ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])); marks.append(rss())
print(" ".join(str(b - a) for a, b in zip(marks, marks[1:])))
"""


def measured_session_bytes(path: Path | str, sessions: int = 3) -> int:
    """Measured memory of one session (Linux): the RSS growth of creating one more InferenceSession
    (1 thread, no arena, freed heap trimmed) in a fresh process, after a first one has absorbed the
    load-time transients. It exceeds `resident_weight_bytes` by the session's fixed overhead (graph,
    kernels, prepacked scales: ~1-3 MB)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(max(2, sessions))], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(np.median([int(x) for x in out[1:]]))
