"""Micro-benchmarks as tiny ONNX graphs with onnxruntime, timed per session run.

Every graph holds `copies` independent instances of one kernel (distinct random weights, one shared
input), so weights are not all cache-resident and one run yields `copies` kernel executions. Linear and
embedding kernels are built with the exporter's own builders (`export.kernels`), so a benchmark runs
exactly the nodes a compressed model's unit runs. A kernel's time is (run time - per-call overhead) /
copies, with the run timed on this thread's CPU clock at 1 thread (see `clock`): the machine is shared,
and preemption by other processes is not the kernel's cost.

The token axis of every graph is dynamic (`M` rows of a linear or embedding, `S` positions of attention,
`R` rows of an elementwise op), as in the exported models (their batch and sequence axes are dynamic): one
session serves every M of a (kernel, K, N) cell, so calibration builds each weight set once (sampling.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from slimformer.export import kernels as K

OPSET = 21


@dataclass(frozen=True)
class Timing:
    """Per-run kernel time (µs, per copy), wall time per run (µs) and graph nodes per copy."""

    kernel_us: list[float]
    wall_us: list[float]
    nodes_per_copy: float

    @property
    def median_us(self) -> float:
        return float(np.median(self.kernel_us))

    @property
    def rel_iqr(self) -> float:
        q1, med, q3 = np.percentile(self.kernel_us, [25, 50, 75])
        return float((q3 - q1) / med) if med > 0 else 0.0


def providers() -> list[str]:
    """Execution providers to calibrate with: CUDA when this onnxruntime has it, else CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in avail \
        else ["CPUExecutionProvider"]


def session(proto: onnx.ModelProto | str | Path, threads: int) -> Any:
    """An InferenceSession with default optimisations (as `export.session` makes) at `threads` threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = proto.SerializeToString() if isinstance(proto, onnx.ModelProto) else str(proto)
    return ort.InferenceSession(src, so, providers=providers())


def clock(threads: int) -> Callable[[], float]:
    """The clock to time runs with: this thread's CPU time at 1 intra-op thread (onnxruntime then runs
    every node on the calling thread, so on an idle machine it equals wall time, and on a shared one it
    leaves out the time other processes hold the core), wall time otherwise."""
    return time.thread_time if threads == 1 else time.perf_counter


def time_graph(proto: onnx.ModelProto, feed: dict[str, np.ndarray], copies: int, threads: int, runs: int,
               warmup: int = 2, call_overhead_us: float = 0.0) -> Timing:
    """Run `proto` `warmup + runs` times; per-run time less the per-call overhead, / copies (µs)."""
    sess = session(proto, threads)
    now = clock(threads)
    for _ in range(warmup):
        sess.run(None, feed)
    cpu, wall = [], []
    for _ in range(runs):
        w0, t0 = time.perf_counter(), now()
        sess.run(None, feed)
        cpu.append(1e6 * (now() - t0))
        wall.append(1e6 * (time.perf_counter() - w0))
    return Timing([max(t - call_overhead_us, 0.0) / copies for t in cpu], wall, float(len(proto.graph.node)) / copies)


def run_times_us(sess: Any, feed: dict[str, np.ndarray], runs: int, now: Callable[[], float]) -> list[float]:
    """`runs` back-to-back runs of one session on `now`'s clock (µs per run, nothing subtracted)."""
    out = []
    for _ in range(runs):
        t0 = now()
        sess.run(None, feed)
        out.append(1e6 * (now() - t0))
    return out


def tiny_graph(copies: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`copies` Adds of one float: run time = per-call overhead + copies x per-node cost (sampling.py fits
    both from several copy counts timed together, so neither is measured on a graph the other is not)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Add", ["x", "x"], [f"y{i}"], name=f"c{i}/Add") for i in range(copies)]
    return _model(nodes, [x], [f"y{i}" for i in range(copies)], []), {"x": np.ones(1, np.float32)}


def call_overhead_us(threads: int, runs: int = 200) -> float:
    """Median time of running a one-node graph on one float (the fixed cost of a session run)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    proto = _model([helper.make_node("Abs", ["x"], ["y"])], [x], ["y"], [])
    return time_graph(proto, {"x": np.ones(1, np.float32)}, 1, threads, runs, warmup=20).median_us


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           inits: list[TensorProto]) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "bench", inputs, outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(K.MS_DOMAIN, 1)])
    m.ir_version = 10
    return m


def _codes(rng: np.random.Generator, n: int, k: int, bits: int, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    lim = (1 << (bits - 1)) - 1
    codes = rng.integers(-lim - 1 if bits == 4 else -lim, lim + 1, size=(n, k), dtype=np.int8)
    groups = 1 if group is None or group >= k else -(-k // group)
    return codes, (rng.random((n, groups), dtype=np.float32) * 0.01 + 1e-3)


def linear_graph(choice: K.KernelChoice, m: int, k: int, n: int, copies: int, seed: int = 0
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`copies` linears y_i = x @ W_i^T + b_i (x: 1 x m x k) lowered as `choice` says (exporter builders)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    outputs = []
    for i in range(copies):
        p, y = f"c{i}", f"y{i}"
        bias = K.f32(f"{p}.bias", rng.standard_normal(n, dtype=np.float32) * np.float32(0.01))
        inits.append(bias)
        if choice.kind in ("matmul", "fp16_matmul"):
            w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.05)
            if choice.kind == "matmul":
                inits.append(K.f32(f"{p}.w", w))
                nodes.append(helper.make_node("MatMul", ["x", f"{p}.w"], [f"{p}/mm"], name=f"{p}/MatMul"))
            else:
                low = K.fp16_matmul("x", f"{p}/mm", p, w)
                inits += low.initializers
                nodes += low.nodes
            nodes.append(helper.make_node("Add", [f"{p}/mm", bias.name], [y], name=f"{p}/Add"))
        else:
            codes, scales = _codes(rng, n, k, choice.bits, choice.group)
            if choice.kind == "matmulnbits":
                low = K.matmul_nbits("x", y, p, codes, scales, choice.bits, choice.group, choice.block or 32,
                                     bias.name)
            elif choice.kind == "dynamic_int8":  # the int8 compute kernel (its weight subgraph folds at load)
                low = K.dynamic_int8("x", y, p, codes, scales, choice.bits, choice.group, bias.name)
            else:
                low = K.dequant_gemm("x", y, p, codes, scales, choice.bits, choice.group, bias.name)
            inits += low.initializers
            nodes += low.nodes
        outputs.append(y)
    uniq = {t.name: t for t in inits}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k])
    return _model(nodes, [x], outputs, list(uniq.values())), linear_feed(m, k, seed)


def linear_feed(m: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The input of a `linear_graph` at m tokens."""
    return {"x": np.random.default_rng(seed + 1).standard_normal((1, m, k), dtype=np.float32)}


def embedding_graph(choice: K.KernelChoice, rows: int, dim: int, m: int, copies: int, seed: int = 0
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`copies` table lookups of m ids (1 x m) from rows x dim tables, lowered as `choice` says."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    outputs = []
    for i in range(copies):
        p, y = f"c{i}", f"y{i}"
        if choice.kind == "gather":
            inits.append(K.f32(f"{p}.w", rng.standard_normal((rows, dim)).astype(np.float32)))
            nodes.append(helper.make_node("Gather", [f"{p}.w", "ids"], [y], name=f"{p}/Gather", axis=0))
        else:
            if choice.kind == "fp16_gather":
                low = K.fp16_gather("ids", y, p, rng.standard_normal((rows, dim)).astype(np.float32))
            else:
                codes, scales = _codes(rng, rows, dim, choice.bits, choice.group)
                low = K.gather_block_quantized("ids", y, p, codes, scales, choice.bits, choice.group,
                                               choice.block or 32) if choice.kind == "gather_block_quantized" \
                    else K.gather_dequant("ids", y, p, codes, scales, choice.group)
            inits += low.initializers
            nodes += low.nodes
        outputs.append(y)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "M"])
    return _model(nodes, [ids], outputs, inits), embedding_feed(rows, m, seed)


def embedding_feed(rows: int, m: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The ids of an `embedding_graph` lookup of m rows."""
    return {"ids": np.random.default_rng(seed + 1).integers(0, rows, size=(1, m), dtype=np.int64)}


def attention_graph(batch_heads: int, seq: int, head_dim: int, copies: int, seed: int = 0
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The attention core as exported Transformers run it: split heads (Reshape+Transpose) of q/k/v,
    scores = q k^T * scale + mask, Softmax, NaN guard (IsNaN+Where), context = p v, merge heads."""
    h, d, s = batch_heads, head_dim, seq
    inits = [K.i64("split", [1, -1, h, d]), K.i64("merge", [1, -1, h * d]),
             K.f32("scale", np.array(1.0 / np.sqrt(d), np.float32)), K.f32("zero", np.zeros((), np.float32))]
    nodes: list[onnx.NodeProto] = []
    outputs = []
    for i in range(copies):
        p = f"c{i}"
        for t, perm in (("q", (0, 2, 1, 3)), ("k", (0, 2, 3, 1)), ("v", (0, 2, 1, 3))):
            nodes.append(helper.make_node("Reshape", [t, "split"], [f"{p}/{t}4"], name=f"{p}/{t}Reshape"))
            nodes.append(helper.make_node("Transpose", [f"{p}/{t}4"], [f"{p}/{t}h"], name=f"{p}/{t}T", perm=perm))
        nodes += [
            helper.make_node("MatMul", [f"{p}/qh", f"{p}/kh"], [f"{p}/qk"], name=f"{p}/QK"),
            helper.make_node("Mul", [f"{p}/qk", "scale"], [f"{p}/qks"], name=f"{p}/Scale"),
            helper.make_node("Add", [f"{p}/qks", "mask"], [f"{p}/sc"], name=f"{p}/Mask"),
            helper.make_node("Softmax", [f"{p}/sc"], [f"{p}/pr"], name=f"{p}/Softmax", axis=-1),
            helper.make_node("IsNaN", [f"{p}/pr"], [f"{p}/nan"], name=f"{p}/IsNaN"),
            helper.make_node("Where", [f"{p}/nan", "zero", f"{p}/pr"], [f"{p}/pw"], name=f"{p}/Where"),
            helper.make_node("MatMul", [f"{p}/pw", f"{p}/vh"], [f"{p}/ctx"], name=f"{p}/PV"),
            helper.make_node("Transpose", [f"{p}/ctx"], [f"{p}/ctxt"], name=f"{p}/ctxT", perm=(0, 2, 1, 3)),
            helper.make_node("Reshape", [f"{p}/ctxt", "merge"], [f"y{i}"], name=f"{p}/merge"),
        ]
        outputs.append(f"y{i}")
    ins = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, "S", h * d]) for t in ("q", "k", "v")]
    ins.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, "S"]))
    return _model(nodes, ins, outputs, inits), attention_feed(h, s, d, seed)


def attention_feed(batch_heads: int, seq: int, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """q, k, v and the (zero) mask of an `attention_graph` at `seq` positions."""
    rng = np.random.default_rng(seed + 1)
    feed = {t: rng.standard_normal((1, seq, batch_heads * head_dim), dtype=np.float32) for t in ("q", "k", "v")}
    feed["mask"] = np.zeros((1, 1, 1, seq), np.float32)
    return feed


def mha_graph(batch_heads: int, seq: int, head_dim: int, copies: int, seed: int = 0
              ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The attention core as slimformer's export lowers it (export/attention.py): one
    com.microsoft.MultiHeadAttention on q/k/v (1, S, heads*head_dim) with an additive (1, 1, S, S) mask bias."""
    h, d = batch_heads, head_dim
    nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], [f"y{i}"], name=f"c{i}/MHA",
                              domain=K.MS_DOMAIN, num_heads=h) for i in range(copies)]
    ins = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, "S", h * d]) for t in ("q", "k", "v")]
    ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, "S", "S"]))
    return _model(nodes, ins, [f"y{i}" for i in range(copies)], []), mha_feed(h, seq, d, seed)


def mha_feed(batch_heads: int, seq: int, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """q, k, v and the (zero) mask bias of an `mha_graph` at `seq` positions."""
    feed = attention_feed(batch_heads, seq, head_dim, seed)
    del feed["mask"]
    feed["bias"] = np.zeros((1, 1, seq, seq), np.float32)
    return feed


ELEMENTWISE = ("add", "layernorm", "gelu")


def elementwise_graph(op: str, rows: int, width: int, copies: int, seed: int = 0
                      ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`copies` of one elementwise op on a 1 x rows x width tensor: add (x + r), layernorm (residual add
    + LayerNormalization, which ORT fuses into SkipLayerNormalization), gelu (com.microsoft Gelu)."""
    inits = [K.f32("gamma", np.ones(width, np.float32)), K.f32("beta", np.zeros(width, np.float32))]
    nodes: list[onnx.NodeProto] = []
    outputs = []
    for i in range(copies):
        p, y = f"c{i}", f"y{i}"
        if op == "add":
            nodes.append(helper.make_node("Add", ["x", "r"], [y], name=f"{p}/Add"))
        elif op == "layernorm":
            nodes += [helper.make_node("Add", ["x", "r"], [f"{p}/s"], name=f"{p}/Add"),
                      helper.make_node("LayerNormalization", [f"{p}/s", "gamma", "beta"], [y], name=f"{p}/LN",
                                       axis=-1, epsilon=1e-12)]
        elif op == "gelu":
            nodes.append(helper.make_node("Gelu", ["x"], [y], name=f"{p}/Gelu", domain=K.MS_DOMAIN))
        else:
            raise ValueError(f"unknown elementwise op {op!r}; use one of {ELEMENTWISE}")
        outputs.append(y)
    ins = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, "R", width]) for t in ("x", "r")]
    return _model(nodes, ins[:1] if op == "gelu" else ins, outputs, inits), elementwise_feed(op, rows, width, seed)


def elementwise_feed(op: str, rows: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs of an `elementwise_graph` at `rows` rows (gelu has one input, add and layernorm two)."""
    rng = np.random.default_rng(seed + 1)
    feed = {t: rng.standard_normal((1, rows, width), dtype=np.float32) for t in ("x", "r")}
    return {"x": feed["x"]} if op == "gelu" else feed
