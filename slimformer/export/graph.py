"""Rewrite an exported fp32 ONNX graph so every compressed matrix runs as a low-bit kernel.

Weights are matched to their slim module by exact content: the exporter writes a linear layer's
weight as an fp32 initializer W^T (MatMul) or W (Gemm), and an embedding table as W (Gather), so the
float32 bytes of both orientations of every SlimLinear / SlimEmbedding's effective weight are hashed
and looked up. This survives the exporter's renaming, constant folding and content de-duplication
(identical initializers become `Identity` aliases, which are inlined first). Modules whose weight is
used by any other kind of node keep that fp32 use (reported in `unconverted`).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from torch import Tensor, nn

from slimformer.compression.embedding_tiers import TieredEmbedding
from slimformer.compression.modules import SlimEmbedding, SlimLinear
from slimformer.export import kernels as K
from slimformer.export.tiered import lower_tiered_embedding

Int8Kernel = Literal["auto", "dequantize", "matmulnbits"]
KernelMode = Literal["exact", "fast"]
_FLOAT_TYPES = (TensorProto.FLOAT,)


@dataclass
class RewriteReport:
    kernels: dict[str, str] = field(default_factory=dict)  # module path -> kernel used
    unconverted: list[str] = field(default_factory=list)  # compressed modules left as fp32 somewhere
    max_opset_needed: int = 0


def _digest(a: np.ndarray) -> tuple[tuple[int, ...], str]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return tuple(a.shape), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _tensor_digest(t: TensorProto) -> tuple[int, tuple[int, ...], str]:
    raw = t.raw_data if t.HasField("raw_data") else nh.to_array(t).tobytes()
    return t.data_type, tuple(t.dims), hashlib.blake2b(raw, digest_size=16).hexdigest()


def compressed_modules(model: nn.Module) -> list[tuple[str, SlimLinear | SlimEmbedding]]:
    """Slim modules whose stored form differs from fp32 (int8/int4/int3/int2/fp16), each object once."""
    out = []
    for path, mod in model.named_modules():  # a shared module is yielded once
        if isinstance(mod, (SlimLinear, SlimEmbedding)) and mod.fmt.bits in (2, 3, 4, 8, 16):
            out.append((path, mod))
    return out


def _rename_inputs(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    if not mapping:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for out in graph.output:
        if out.name in mapping:  # keep graph outputs: alias back through an Identity
            graph.node.append(onnx.helper.make_node("Identity", [mapping[out.name]], [out.name]))


def normalise(graph: onnx.GraphProto) -> None:
    """Inline `Identity(initializer)` aliases and turn large Constant nodes into initializers."""
    inits = {t.name for t in graph.initializer}
    mapping: dict[str, str] = {}
    keep = []
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in outputs and len(node.attribute) == 1 \
                and node.attribute[0].name == "value" and int(np.prod(node.attribute[0].t.dims)) >= 64:
            t = TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
            inits.add(t.name)
            continue
        if node.op_type == "Identity" and node.input[0] in (inits | set(mapping)) and node.output[0] not in outputs:
            src = node.input[0]
            mapping[node.output[0]] = mapping.get(src, src)
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    _rename_inputs(graph, mapping)


def dedup_initializers(graph: onnx.GraphProto) -> int:
    """Store tensors with identical content once (other names are renamed to the first); returns
    the number of initializers removed."""
    first: dict[tuple, str] = {}
    mapping: dict[str, str] = {}
    keep = []
    for t in graph.initializer:
        key = _tensor_digest(t)
        if key in first:
            mapping[t.name] = first[key]
        else:
            first[key] = t.name
            keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _rename_inputs(graph, mapping)
    return len(mapping)


def prune_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _stored(path: str, mod: SlimLinear | SlimEmbedding) -> tuple[np.ndarray, np.ndarray]:
    """The module's codes and scales, checked to reproduce its effective weight exactly."""
    codes, scales = _np(mod.codes), _np(mod.scales)
    w = _np(mod.weight)
    if codes.shape != w.shape or not np.array_equal(K.dequantized(codes, scales, mod.fmt.group_size), w):
        raise ValueError(f"{path}: codes * scales do not reproduce the module's weight; it cannot be exported "
                         "as an exact integer kernel")
    return codes, scales


def module_mode(mod: SlimLinear | SlimEmbedding, mode: KernelMode | None) -> str:
    """How one module lowers: the override `mode` when given, else its own kernel (int8 -> the fast kernel)."""
    return mode if mode is not None else K.unit_kernel_mode(getattr(mod, "kernel", "exact"))


class _Rewriter:
    def __init__(self, graph: onnx.GraphProto, model: nn.Module, int8_kernel: Int8Kernel,
                 mode: KernelMode | None = None, act_max: dict[str, np.ndarray] | None = None,
                 fuse_projections: bool = True) -> None:
        self.g, self.int8_kernel, self.mode, self.act_max = graph, int8_kernel, mode, act_max or {}
        self.report = RewriteReport()
        self.inits = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in graph.output}
        # content digest -> (module path, module, whether the tensor is W^T); a square symmetric weight
        # (or two modules with equal weights) gives several candidates, the node's form picks one
        lookup: dict[tuple, list[tuple[str, SlimLinear | SlimEmbedding, bool]]] = defaultdict(list)
        for path, mod in compressed_modules(model):
            w = _np(mod.weight)
            lookup[_digest(w)].append((path, mod, False))
            if isinstance(mod, SlimLinear):
                lookup[_digest(w.T)].append((path, mod, True))
        for path, tmod in model.named_modules():  # frequency-tiered tables (export/tiered.py)
            if isinstance(tmod, TieredEmbedding):
                lookup[_digest(_np(tmod.weight))].append((path, tmod, False))  # type: ignore[arg-type]
        self.matched: dict[str, list[tuple[str, SlimLinear | SlimEmbedding, bool]]] = {}
        for t in graph.initializer:
            if t.data_type in _FLOAT_TYPES and len(t.dims) == 2:
                hits = lookup.get(_digest(nh.to_array(t)))
                if hits:
                    self.matched[t.name] = hits
        self.new_inits: dict[str, TensorProto] = {}
        self.uses: Counter[str] = Counter()
        self.dropped: set[tuple[str, ...]] = set()  # output names of folded Add nodes
        self.produced: set[str] = set()  # outputs of the nodes added so far
        self.readers = self._fast_readers() if mode != "exact" else {}
        self.fuse = fuse_projections
        self.groups = self._int8_groups() if fuse_projections else {}
        self.group_of = {node.output[0]: x for x, members in self.groups.items() for _, _, node in members}
        self.skip: set[str] = set()  # outputs of member MatMuls computed by their group's fused kernel

    # -- helpers ------------------------------------------------------------------------------------
    def _fast_readers(self) -> dict[str, list[tuple[str, SlimLinear]]]:
        """Input tensor -> the distinct int4/int8 linears (path, module) whose MatMul/Gemm reads it and
        that lower to the int8 GEMM (per-unit int8 kernels or the fast mode: the ones that can share SmoothQuant
        factors)."""
        out: dict[str, list[tuple[str, SlimLinear]]] = defaultdict(list)
        for node in self.g.node:
            if node.op_type == "MatMul" and len(node.input) == 2:
                hit = self._pick(node.input[1], SlimLinear, True)
            elif node.op_type == "Gemm" and not _attr(node, "transA", 0):
                hit = self._pick(node.input[1], SlimLinear, not _attr(node, "transB", 0))
            else:
                continue
            if hit is None or hit[1].fmt.bits not in (4, 8):
                continue
            mod = hit[1]
            choice = K.choose_linear_kernel(mod.fmt.bits, mod.fmt.group_size, mod.in_features, mod.out_features,
                                            self.int8_kernel, module_mode(mod, self.mode))
            if choice.kind == "dynamic_int8" and all(p != hit[0] for p, _ in out[node.input[0]]):
                out[node.input[0]].append(hit)
        return out

    def _int8_groups(self) -> dict[str, list[tuple[str, SlimLinear, onnx.NodeProto]]]:
        """Input tensor -> the MatMuls (>= 2, distinct modules) reading it that all lower to the int8 GEMM
        (query/key/value of a layer with the same kernel): they run as one DynamicQuantizeMatMul on the
        concatenated weights, so the input is quantised once. Exact: the activation's per-tensor scale depends
        on the input only, and each output column keeps its own weight row and scale."""
        out: dict[str, list[tuple[str, SlimLinear, onnx.NodeProto]]] = defaultdict(list)
        for node in self.g.node:
            if node.op_type != "MatMul" or len(node.input) != 2 or node.output[0] in self.outputs:
                continue
            hit = self._pick(node.input[1], SlimLinear, True)
            if hit is None or hit[1].fmt.bits not in (4, 8):
                continue
            mod = hit[1]
            choice = K.choose_linear_kernel(mod.fmt.bits, mod.fmt.group_size, mod.in_features, mod.out_features,
                                            self.int8_kernel, module_mode(mod, self.mode))
            if choice.kind == "dynamic_int8" and all(p != hit[0] for p, _, _ in out[node.input[0]]):
                out[node.input[0]].append((hit[0], mod, node))
        uses = Counter(path for members in out.values() for path, _, _ in members)
        groups = {}
        for x, members in out.items():
            with_bias = [self._bias_add(n, m.out_features)[0] is not None for _, m, n in members]
            # a module used twice (shared layers) keeps its own kernel: two groups concatenating it would make
            # the session fold (and hold) two copies of its weight
            single = all(uses[p] == 1 for p, _, _ in members)
            # one quantised input: every member smooths it with the same factors (or none does)
            same = len({self._smoothing_key(x, p, m) for p, m, _ in members}) == 1
            if len(members) >= 2 and single and same and (all(with_bias) or not any(with_bias)):
                groups[x] = members
        return groups

    def fused_group(self, x: str) -> list[onnx.NodeProto]:
        """One DynamicQuantizeMatMul for every member of `groups[x]` (emitted at the first member's place):
        each member's weight subgraph as `dynamic_int8` builds it, their int8 weights, scales and biases
        concatenated (constants: folded at load, so the session holds each weight once, as before), and a
        Split into the members' outputs."""
        members = self.groups[x]
        nodes: list[onnx.NodeProto] = []
        parts: list[tuple[str, str, str | None, str, int]] = []  # (B, scale, bias, y, N) per member
        xq = None
        for path, mod, node in members:
            bias, add = self._bias_add(node, mod.out_features)
            y = node.output[0]
            if add is not None:
                self.dropped.add(tuple(add.output))
                y = add.output[0]
            self.skip.add(node.output[0])
            lowered = self.linear(node.input[0], mod, path, bias, y)
            dq = [n for n in lowered if n.op_type == "DynamicQuantizeMatMul"]
            if len(dq) != 1:  # pragma: no cover - dynamic_int8 always ends in one
                raise ValueError(f"{path}: expected one DynamicQuantizeMatMul")
            nodes.extend(n for n in lowered if n is not dq[0])
            ins = list(dq[0].input) + [""] * (5 - len(dq[0].input))
            if xq is not None and ins[0] != xq:  # pragma: no cover - members read one input (and one smoothing)
                raise ValueError(f"{path}: members of a fused projection read different inputs")
            xq = ins[0]
            parts.append((ins[1], ins[2], ins[4] or None, y, mod.out_features))
        p = f"{members[0][2].output[0]}/fused{len(members)}"
        cat = [helper.make_node("Concat", [b for b, *_ in parts], [f"{p}/B"], name=f"{p}/ConcatB", axis=1),
               helper.make_node("Concat", [s for _, s, *_ in parts], [f"{p}/scale"], name=f"{p}/ConcatScale",
                                axis=0)]
        bias_in = ""
        if parts[0][2] is not None:
            cat.append(helper.make_node("Concat", [b for _, _, b, _, _ in parts], [f"{p}/bias"],  # type: ignore[misc]
                                        name=f"{p}/ConcatBias", axis=0))
            bias_in = f"{p}/bias"
        sizes = f"{p}.split"
        self.new_inits[sizes] = nh.from_array(np.asarray([n for *_, n in parts], dtype=np.int64), sizes)
        cat += [helper.make_node("DynamicQuantizeMatMul", [xq or x, f"{p}/B", f"{p}/scale", "", bias_in], [f"{p}/y"],
                                 name=f"{p}/DynamicQuantizeMatMul", domain=K.MS_DOMAIN),
                helper.make_node("Split", [f"{p}/y", sizes], [y for *_, y, _ in parts], name=f"{p}/Split", axis=-1)]
        for path, _, _ in members:
            self.report.kernels[path] += f",fused x{len(members)}"
        return nodes + cat

    def _bias_add(self, node: onnx.NodeProto, n_out: int) -> tuple[str | None, onnx.NodeProto | None]:
        """A single `Add(matmul_out, bias[N])` consumer whose bias is a constant: fold it into the kernel."""
        out = node.output[0]
        users = self.consumers.get(out, [])
        if out in self.outputs or len(users) != 1 or users[0].op_type != "Add":
            return None, None
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        t = self.inits.get(other)
        if t is None or t.data_type != TensorProto.FLOAT or tuple(t.dims) != (n_out,):
            return None, None
        return other, add

    def _prefix(self, path: str) -> str:
        """Names of one use of a module (a shared module is used by several nodes; its tensors are
        identical and merged by content afterwards)."""
        n = self.uses[path]
        self.uses[path] += 1
        return path if n == 0 else f"{path}.use{n}"

    def _add(self, low: K.Lowered) -> list[onnx.NodeProto]:
        """Register the kernel's initializers; nodes whose outputs an earlier use already computes (the
        weight subgraph of a shared module's fast kernel) are dropped, so it is built and folded once."""
        for t in low.initializers:
            self.new_inits.setdefault(t.name, t)
        nodes = [n for n in low.nodes if not set(n.output) <= self.produced]
        for n in nodes:
            self.produced.update(n.output)
        return nodes

    def _smoothing(self, x: str, path: str, mod: SlimLinear) -> tuple[np.ndarray | None, str | None]:
        """(SmoothQuant factors, shared smoothed-input name) of the int8-GEMM linear `mod` reading `x`: its own
        factors (`SlimLinear.smooth`, what torch computes) when it has them, else under mode 'fast' factors from
        `act_max`; the smoothed input is shared (one x / s node) when every int8-GEMM reader of x uses the same
        factors (query/key/value: SmoothQuant's shared-input rule), else each linear smooths its own copy."""
        if getattr(mod, "kernel", None) is None:  # a tied LM head reading a table: never the int8 GEMM
            return None, None
        siblings = self.readers.get(x, [])
        own = getattr(mod, "smooth", None)
        if own is not None:
            if all(p != path for p, _ in siblings):  # not lowered to the int8 GEMM (mode 'exact' or a 3-bit unit)
                return None, None
            smooth = _np(own).astype(np.float32)
            shared = len(siblings) > 1 and all(m.smooth is not None and np.array_equal(_np(m.smooth), smooth)
                                               for _, m in siblings)
            return smooth, f"{x}/smoothed" if shared else None
        if self.mode != "fast" or path not in self.act_max:
            return None, None
        if len(siblings) > 1 and all(s in self.act_max and m.smooth is None for s, m in siblings):
            # one set of factors for every linear reading x (query/key/value: SmoothQuant's shared-input
            # rule, max |W| over all their rows), so x / smooth is one node, not one per linear
            w_all = np.concatenate([K.dequantized(*_stored(s, m), m.fmt.group_size) for s, m in siblings])
            return K.smoothing(self.act_max[path], w_all), f"{x}/smoothed"
        codes, scales = _stored(path, mod)
        return K.smoothing(self.act_max[path], K.dequantized(codes, scales, mod.fmt.group_size)), None

    def _smoothing_key(self, x: str, path: str, mod: SlimLinear) -> str:
        """Equal for linears that quantise the same tensor: no smoothing, or one shared smoothed input."""
        smooth, xs = self._smoothing(x, path, mod)
        return "" if smooth is None else xs or f"own:{path}"

    # -- lowering -----------------------------------------------------------------------------------
    def linear(self, x: str, mod: SlimLinear, path: str, bias: str | None, y: str) -> list[onnx.NodeProto]:
        fmt = mod.fmt
        p = self._prefix(path or "linear")
        if fmt.bits == 16:
            nodes = self._add(K.fp16_matmul(x, y if bias is None else f"{p}/mm", p, _np(mod.weight).T))
            if bias is not None:
                nodes.append(onnx.helper.make_node("Add", [f"{p}/mm", bias], [y], name=f"{p}/Add"))
            self.report.kernels[path] = "fp16 weight + Cast + MatMul"
            return nodes
        codes, scales = _stored(path, mod)
        smooth, xs = self._smoothing(x, path, mod)
        low, need = K.lower_linear(x, y, p, codes, scales, fmt.bits, fmt.group_size, bias, self.int8_kernel,
                                   module_mode(mod, self.mode), smooth, wp=path or "linear", xs=xs)
        self.report.max_opset_needed = max(self.report.max_opset_needed, need)
        self.report.kernels[path] = low.kernel
        return self._add(low)

    def embedding(self, ids: str, y: str, mod: SlimEmbedding, path: str) -> list[onnx.NodeProto]:
        p = self._prefix(path or "embedding")
        if isinstance(mod, TieredEmbedding):
            low = lower_tiered_embedding(ids, y, p, mod)
            self.report.kernels[path] = low.kernel
            return self._add(low)
        fmt = mod.fmt
        w = _np(mod.weight)
        if fmt.bits == 16:
            low = K.fp16_gather(ids, y, p, w)
        else:
            codes, scales = _stored(path, mod)
            low = K.lower_embedding(ids, y, p, codes, scales, fmt.bits, fmt.group_size)
        self.report.kernels[path] = low.kernel
        return self._add(low)

    def run(self) -> RewriteReport:
        out_nodes: list[onnx.NodeProto] = []
        for node in self.g.node:
            if node.op_type == "Add" and tuple(node.output) in self.dropped:  # folded into its MatMul's kernel
                continue
            if node.output and node.output[0] in self.skip:  # computed by its group's fused kernel
                continue
            if node.output and node.output[0] in self.group_of:
                out_nodes.extend(self.fused_group(self.group_of[node.output[0]]))
                continue
            repl = self._lower(node)
            out_nodes.extend([node] if repl is None else repl)
        del self.g.node[:]
        self.g.node.extend(out_nodes)
        self.g.initializer.extend(self.new_inits.values())
        prune_initializers(self.g)
        left = {t.name for t in self.g.initializer}
        self.report.unconverted = sorted({hits[0][0] for name, hits in self.matched.items() if name in left})
        return self.report

    def _pick(self, name: str, cls: type, transposed: bool | None) -> tuple[str, Any] | None:
        for path, mod, t in self.matched.get(name, ()):
            if isinstance(mod, cls) and (transposed is None or t == transposed):
                return path, mod
        return None

    def _lower(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if node.op_type == "MatMul" and len(node.input) == 2:
            hit = self._pick(node.input[1], SlimLinear, True)  # MatMul(x, W^T)
            if hit is None:
                return None
            path, mod = hit
            bias, add = self._bias_add(node, mod.out_features)
            y = node.output[0]
            if add is not None:
                self.dropped.add(tuple(add.output))
                y = add.output[0]
            return self.linear(node.input[0], mod, path, bias, y)
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                return None
            hit = self._pick(node.input[1], SlimLinear, not _attr(node, "transB", 0))  # Gemm(x, W, transB=1)
            if hit is None:
                return None
            path, mod = hit
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and (bias not in self.inits or tuple(self.inits[bias].dims) != (mod.out_features,)):
                return None
            return self.linear(node.input[0], mod, path, bias, node.output[0])
        if node.op_type == "Einsum" and len(node.input) == 2 and _is_table_product(node):
            hit = self._pick(node.input[1], SlimEmbedding, False)  # a tied LM head: h · tableᵀ
            if hit is None:
                return None
            return self.linear(node.input[0], hit[1], hit[0], None, node.output[0])  # type: ignore[arg-type]
        if node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
            hit = self._pick(node.input[0], SlimEmbedding, False) or self._pick(node.input[0], TieredEmbedding, False)
            if hit is None:
                return None
            path, mod = hit
            return self.embedding(node.input[1], node.output[0], mod, path)
        return None


def _is_table_product(node: onnx.NodeProto) -> bool:
    """Einsum `...d,vd->...v`: activations times a (vocab, dim) table transposed (a tied LM head)."""
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    lhs, _, out = eq.partition("->")
    a, _, b = lhs.partition(",")
    return len(b) == 2 and a.endswith(b[1]) and out == a[:-1] + b[0]


def rewrite(model_proto: onnx.ModelProto, model: nn.Module, int8_kernel: Int8Kernel = "auto",
            mode: KernelMode | None = None, act_max: dict[str, np.ndarray] | None = None,
            fuse_projections: bool = True) -> RewriteReport:
    """Lower every compressed matrix of `model` in its exported graph (in place). mode None: each module's
    own kernel (SlimLinear.kernel; int8 units with their own SmoothQuant factors `SlimLinear.smooth` when set,
    as torch computes them); 'exact' / 'fast' override every module; 'fast' uses a module's own factors, else
    `act_max` (module path -> max |input| per input feature) for SmoothQuant factors.
    fuse_projections: int8-GEMM linears reading one input (q/k/v) run as one kernel (`_Rewriter.fused_group`)."""
    g = model_proto.graph
    normalise(g)
    report = _Rewriter(g, model, int8_kernel, mode, act_max, fuse_projections).run()
    dedup_initializers(g)
    prune_initializers(g)
    return report


def op_counts(model_proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model_proto.graph.node)
