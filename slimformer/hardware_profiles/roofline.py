"""The forward pass as ops (`forward_ops`, shared with the calibrated model in predict.py) and the analytic
roofline latency *estimate* over them: a per-op roofline summed over one forward pass (no model is run).

This is the uncalibrated latency model (`latency.source: estimate`; the LatencySource over it is
evaluators/latency/roofline.py); the calibrated one (predict.py) prices the same ops per kernel class.
Every result carries the label "estimate (roofline)" and must be reported as an estimate, never as a measured latency.

For each op of the forward pass, time = max(flops / peak, bytes / bandwidth) + per-op overhead, with the
three machine numbers taken from a `HardwareProfile`. Ops are summed serially (no overlap between ops).

What is modelled (M = batch * seq tokens, activations fp32):
- Linear units, after structured pruning: `heads_kept` scales the out dim of query/key/value (or fused
  qkv) and the in dim of attn_out by heads_kept / num_heads; `neurons_kept` scales the out dim of ffn_in
  and the in dim of ffn_out by neurons_kept / intermediate. Dense: 2*M*in*out flops, one op. Low rank r
  (clamped to min(in, out)): two ops, in->r and r->out, 2*M*r*(in+out) flops in all; r above
  in*out/(in+out) is therefore *slower* than dense. Activation bytes 4*M*(in+out) per op.
- Weight bytes by bits: 32 -> 4, 16 -> 2, 8 -> 1, 4 -> 0.5 bytes per weight, plus one fp32 scale per
  output channel (group_size None) or per group along the input dim, for 8 and 4 bits; fp32 bias.
  Weight-only quantised layers still compute in fp32 at the fp32 peak; dequantisation is assumed fused
  into the matmul, so its only cost is reading the packed weights and scales.
- A unit whose kernel is "int8" (onnxruntime's DynamicQuantizeMatMul) reads int8 weights with one fp32 scale
  per row (a 4-bit unit is widened to int8 at load), plus a quantisation pass over its input (fp32 read,
  uint8 written), and computes at the profile's `peak_gflops["dynamic_int8"]` when `slimformer calibrate`
  measured one; without it, at the fp32 peak (an assumption: the estimate then prices no int8 speed-up).
- Sparsity gives no speed-up in this version: unstructured sparsity runs dense kernels over weights
  stored dense, and 2:4 has no CPU kernel here either. Estimates ignore `sparsity` and `pattern`.
- Sharing changes no compute (shared layers still run); it only changes memory, which is accounted
  elsewhere. Estimates ignore `plan.sharing`.
- Per block: attention scores and context matmuls (2*batch*heads_kept*seq*seq*head_dim flops each),
  softmax (read + write of the scores), two LayerNorms, GELU over the kept FFN neurons and two residual
  adds, as bytes over bandwidth.
- Embedding units: M rows gathered (M*dim*bytes_per_weight, plus scales), the fp32 rows written; with a
  rank, the gathered M*r rows are projected by an r x dim matmul. Embeddings are summed and LayerNorm'd.
- `flops` counts matmul flops only (elementwise ops are taken as memory-bound); `flops_proxy` returns it.

Known blind spots (for the calibrated model): caches (bandwidth is a large-copy DRAM rate, so weights
that fit in cache look slower than they are), head split/merge copies, attention masks, task heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from slimformer.compression.modules import WeightFormat, matrix_bytes
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.errors import ConfigError, PlanError
from slimformer.hardware_profiles.profile import HardwareProfile
from slimformer.models.base import LayerInfo, Unit

LABEL = "estimate (roofline)"
_FP32 = 4.0


class ForwardOp(NamedTuple):
    """One op of a forward pass: costs plus the shape a calibrated model needs.

    linear: m tokens, k in, n out, spec the unit's spec (bias in has_bias); embedding: m rows gathered of
    width n (k = rows of the table, or the rank for the projection); attention: m = batch * heads,
    k = seq, n = head_dim; elementwise: m elements (of the op's largest tensor).
    """

    name: str
    kind: str
    flops: float
    weight_bytes: float
    activation_bytes: float
    m: int = 0
    k: int = 0
    n: int = 0
    spec: UnitSpec | None = None
    has_bias: bool = False


_Op = ForwardOp


@dataclass(frozen=True)
class RooflineEstimate:
    """An analytic forward-pass latency *estimate* (milliseconds) and the totals behind it.

    ms = sum over ops of max(compute, memory) + overhead, so
    max(compute_ms, memory_ms) + overhead_ms <= ms <= compute_ms + memory_ms + overhead_ms.
    compute_ms / memory_ms are the per-op compute and memory times summed over all ops.
    """

    ms: float
    flops: float
    weight_bytes: float
    activation_bytes: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    label: str = LABEL


@dataclass(frozen=True)
class OpCost:
    """One op of the forward pass with its estimated cost (for inspection and later calibration)."""

    name: str
    kind: str  # "linear", "attention", "elementwise" or "embedding"
    flops: float
    weight_bytes: float
    activation_bytes: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.overhead_ms


INT8_KERNEL_CLASS = "dynamic_int8"  # the peak_gflops key of the int8 compute kernel


def _weight_bytes(rows: int, cols: int, spec: UnitSpec) -> float:
    """Bytes the kernel reads for a rows x cols weight: stored densely (CPU kernels are dense), at
    spec.bits with fp32 scales - the same accounting as compression.memory; the int8 kernel reads int8
    weights with one scale per row, whatever the stored width."""
    if spec.kernel == "int8":
        return float(matrix_bytes((rows, cols), WeightFormat(8, None), rows * cols))
    fmt = WeightFormat(spec.bits, spec.group_size if spec.quantized else None)
    return float(matrix_bytes((rows, cols), fmt, rows * cols))


def _act_bytes(m: int, in_f: int, out_f: int, spec: UnitSpec) -> float:
    """fp32 input read and output written; the int8 kernel also quantises its input (fp32 read, uint8 written)."""
    return _FP32 * m * (in_f + out_f) + (5.0 * m * in_f if spec.kernel == "int8" else 0.0)


def _scaled(dim: int, kept: int | None, total: int) -> int:
    if kept is None or kept == total or total <= 0:
        return dim
    return max(1, round(dim * kept / total))


def _linear_ops(name: str, out_f: int, in_f: int, spec: UnitSpec, bias: bool, m: int) -> Iterator[_Op]:
    bias_bytes = _FP32 * out_f if bias else 0.0
    if spec.rank is None:
        yield _Op(name, "linear", 2.0 * m * in_f * out_f, _weight_bytes(out_f, in_f, spec) + bias_bytes,
                  _act_bytes(m, in_f, out_f, spec), m, in_f, out_f, spec, bias)
        return
    r = min(spec.rank, in_f, out_f)
    yield _Op(f"{name}[in->r]", "linear", 2.0 * m * in_f * r, _weight_bytes(r, in_f, spec),
              _act_bytes(m, in_f, r, spec), m, in_f, r, spec, False)
    yield _Op(f"{name}[r->out]", "linear", 2.0 * m * r * out_f, _weight_bytes(out_f, r, spec) + bias_bytes,
              _act_bytes(m, r, out_f, spec), m, r, out_f, spec, bias)


def _embedding_ops(unit: Unit, spec: UnitSpec, m: int) -> Iterator[_Op]:
    rows, dim = unit.shape
    if spec.rank is None:
        yield _Op(unit.name, "embedding", 0.0, _weight_bytes(m, dim, spec), _FP32 * m * dim, m, rows, dim, spec)
        return
    r = min(spec.rank, unit.shape[0], dim)
    yield _Op(f"{unit.name}[gather]", "embedding", 0.0, _weight_bytes(m, r, spec), _FP32 * m * r, m, rows, r, spec)
    yield _Op(f"{unit.name}[r->dim]", "linear", 2.0 * m * r * dim, _weight_bytes(dim, r, spec),
              _FP32 * m * (r + dim), m, r, dim, spec, False)


def forward_ops(units: Sequence[Unit], layers: Sequence[LayerInfo], plan: CompressionPlan, batch: int,
                seq: int) -> Iterator[ForwardOp]:
    """Every op of one forward pass of the plan-compressed model, in order (see ForwardOp)."""
    if batch < 1 or seq < 1:
        raise ConfigError(f"batch and seq must be >= 1 for a latency estimate (got batch={batch}, seq={seq})")
    m = batch * seq
    by_layer: dict[int, list[Unit]] = {info.index: [] for info in layers}
    loose: list[Unit] = []
    embeddings: list[Unit] = []
    shapes: dict[str, tuple[int, int]] = {}
    for u in units:
        shapes[u.name] = u.shape
        if u.role == "embedding":
            embeddings.append(u)
        elif u.layer is not None and u.layer in by_layer:
            by_layer[u.layer].append(u)
        else:
            loose.append(u)  # a linear outside any described block: costed unpruned

    if embeddings:
        dim = embeddings[0].shape[1]
        for u in embeddings:
            yield from _embedding_ops(u, plan.unit(u.name), m)
        for i in range(1, len(embeddings)):
            yield _Op(f"embeddings.add{i}", "elementwise", 0.0, 0.0, 3 * _FP32 * m * dim, m * dim)
        yield _Op("embeddings.layernorm", "elementwise", 0.0, 2 * _FP32 * dim, 2 * _FP32 * m * dim, m * dim)

    for info in layers:
        spec = plan.layer(info.index)
        heads_total, inter_total = info.num_heads, info.intermediate
        if spec.heads_kept is not None and spec.heads_kept > heads_total:
            raise PlanError(
                f"layer {info.index}: heads_kept {spec.heads_kept} exceeds its {heads_total} heads; "
                f"use at most {heads_total} or null"
            )
        if spec.neurons_kept is not None and spec.neurons_kept > inter_total:
            raise PlanError(
                f"layer {info.index}: neurons_kept {spec.neurons_kept} exceeds its {inter_total} FFN "
                f"neurons; use at most {inter_total} or null"
            )
        heads = spec.heads_kept or heads_total
        inter = spec.neurons_kept or inter_total
        for u in by_layer[info.index]:
            out_f, in_f = u.shape
            role = u.role
            if role in ("query", "key", "value", "qkv"):
                out_f = _scaled(out_f, spec.heads_kept, heads_total)
            elif role == "attn_out":
                in_f = _scaled(in_f, spec.heads_kept, heads_total)
            elif role in ("ffn_in", "ffn_gate"):
                out_f = _scaled(out_f, spec.neurons_kept, inter_total)
            elif role == "ffn_out":
                in_f = _scaled(in_f, spec.neurons_kept, inter_total)
            yield from _linear_ops(u.name, out_f, in_f, plan.unit(u.name), u.has_bias, m)

        out_shape = shapes.get(info.attn_out_unit)
        hidden = out_shape[0] if out_shape is not None else heads_total * info.head_dim
        ctx = float(batch * seq * heads * info.head_dim)  # elements of one of q, k, v or the context
        scores = float(batch * heads * seq * seq)
        mm = 2.0 * scores * info.head_dim
        p = f"layer{info.index}"
        bh, hd = batch * heads, info.head_dim
        yield _Op(f"{p}.attn_scores", "attention", mm, 0.0, _FP32 * (2 * ctx + scores), bh, seq, hd)
        yield _Op(f"{p}.attn_softmax", "attention", 0.0, 0.0, 2 * _FP32 * scores, bh, seq, hd)
        yield _Op(f"{p}.attn_context", "attention", mm, 0.0, _FP32 * (scores + 2 * ctx), bh, seq, hd)
        act = _FP32 * m * hidden
        yield _Op(f"{p}.attn_residual", "elementwise", 0.0, 0.0, 3 * act, m * hidden)
        yield _Op(f"{p}.attn_layernorm", "elementwise", 0.0, 2 * _FP32 * hidden, 2 * act, m * hidden)
        yield _Op(f"{p}.ffn_gelu", "elementwise", 0.0, 0.0, 2 * _FP32 * m * inter, m * inter)
        yield _Op(f"{p}.ffn_residual", "elementwise", 0.0, 0.0, 3 * act, m * hidden)
        yield _Op(f"{p}.ffn_layernorm", "elementwise", 0.0, 2 * _FP32 * hidden, 2 * act, m * hidden)

    for u in loose:
        yield from _linear_ops(u.name, u.shape[0], u.shape[1], plan.unit(u.name), u.has_bias, m)


def _rates(profile: HardwareProfile) -> tuple[float, float, float]:
    """(flops per ms, bytes per ms, overhead ms per op)."""
    return profile.peak_gflops_fp32 * 1e6, profile.mem_bandwidth_gbs * 1e6, profile.per_op_overhead_us * 1e-3


def _op_flops_per_ms(op: ForwardOp, profile: HardwareProfile, fp32_per_ms: float) -> float:
    """The compute rate of one op: the int8 kernel's measured peak when the profile has one, else fp32's."""
    if op.kind == "linear" and op.spec is not None and op.spec.kernel == "int8":
        peak = profile.peak_gflops.get(INT8_KERNEL_CLASS)
        return fp32_per_ms if peak is None else peak * 1e6
    return fp32_per_ms


def estimate_latency(units: Sequence[Unit], layers: Sequence[LayerInfo], plan: CompressionPlan,
                     profile: HardwareProfile, batch: int = 1, seq: int = 128) -> RooflineEstimate:
    """Roofline *estimate* of one forward pass of the plan-compressed model (see the module docstring)."""
    flops_per_ms, bytes_per_ms, overhead = _rates(profile)
    total = flops = wbytes = abytes = compute = memory = 0.0
    n = 0
    for op in forward_ops(units, layers, plan, batch, seq):
        f, wb, ab = op.flops, op.weight_bytes, op.activation_bytes
        c = f / _op_flops_per_ms(op, profile, flops_per_ms)
        mem = (wb + ab) / bytes_per_ms
        total += c if c > mem else mem
        flops += f
        wbytes += wb
        abytes += ab
        compute += c
        memory += mem
        n += 1
    overhead_ms = n * overhead
    return RooflineEstimate(
        ms=total + overhead_ms, flops=flops, weight_bytes=wbytes, activation_bytes=abytes,
        compute_ms=compute, memory_ms=memory, overhead_ms=overhead_ms,
    )


def latency_breakdown(units: Sequence[Unit], layers: Sequence[LayerInfo], plan: CompressionPlan,
                      profile: HardwareProfile, batch: int = 1, seq: int = 128) -> list[OpCost]:
    """The ops behind `estimate_latency`, one `OpCost` each, in forward order (their ms sum to its ms)."""
    flops_per_ms, bytes_per_ms, overhead = _rates(profile)
    return [
        OpCost(op.name, op.kind, op.flops, op.weight_bytes, op.activation_bytes,
               op.flops / _op_flops_per_ms(op, profile, flops_per_ms),
               (op.weight_bytes + op.activation_bytes) / bytes_per_ms, overhead)
        for op in forward_ops(units, layers, plan, batch, seq)
    ]


def flops_proxy(units: Sequence[Unit], layers: Sequence[LayerInfo], plan: CompressionPlan,
                batch: int = 1, seq: int = 128) -> float:
    """Total matmul FLOPs of one forward pass of the plan-compressed model (the same ops as the estimate)."""
    return sum(op.flops for op in forward_ops(units, layers, plan, batch, seq))
