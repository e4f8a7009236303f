"""Attention lowered to onnxruntime's fused `com.microsoft.MultiHeadAttention` at trace time.

Why at trace time: every family here computes its attention core with `F.scaled_dot_product_attention`
(transformers' `sdpa` attention for HF encoders, timm's fused attention), and torch's TorchScript exporter
turns that one call into ~12 nodes per layer (Transpose of K, two Mul by sqrt(scale), MatMul, Where on the
boolean mask, Add, Softmax, IsNaN + Where (a NaN guard for fully masked rows), MatMul). Registering our own
ONNX symbolic for `aten::scaled_dot_product_attention` while tracing replaces that call by one fused node
without touching any model code or any family's module (no `family ==`), and it sees the call's real
arguments (mask dtype, causal flag, scale, head count) instead of guessing them from a graph pattern.
onnxruntime's transformers optimizer does not recognise the exported pattern (measured: it fuses only
BiasGelu / LayerNorm on our graphs), and a pattern match on the exported graph would break with every
exporter change.

What the node computes, against torch's SDPA (`(q k^T * scale + mask) softmax v`, q/k/v (B, N, S, H)):
* query/key/value are handed over as (B, S, N*H): SDPA's (B, N, S, H) inputs are transposed back and
  merged (MultiHeadAttention's input layout); its (B, S, N*H) output is split and transposed to SDPA's
  (B, N, S, H) layout. The model's own `view + transpose` before SDPA and `transpose + reshape` after it
  then meet our inverse Transposes and Reshapes, which `cancel_layout_pairs` removes after export, so the
  fused graph has no extra Transpose at all.
* `scale`: the call's scale (or 1/sqrt(H), MultiHeadAttention's default, when it has none).
* mask: a boolean mask (True = attend) becomes an additive `attention_bias` 0 / float32 lowest, computed
  once per distinct mask (shared by all layers); a float mask is added as is. Either is expanded to
  (B or 1, N or 1, S, L). A row with every key masked differs: torch returns 0 there, the fused kernel the
  mean of the values; the HF padding masks never mask every key of a row (a text has >= 1 token), and
  padded query rows are pooled away (tested with padded batches).
Calls the fused node does not cover (dropout, `is_causal`, grouped-query `enable_gqa`, a head count or
scale that is not a trace-time constant) fall back to torch's own symbolic: the graph is then what it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from torch.overrides import TorchFunctionMode

MS_DOMAIN = "com.microsoft"
_SDPA = "aten::scaled_dot_product_attention"
_SYMBOLIC_OPSET = 14  # torch registers its SDPA symbolic at opset 14; ours must cover every traced opset >= it
_LOWEST = float(np.finfo(np.float32).min)
BSD_TAG = "slimformer_mha"  # name prefix of the layout nodes we emit (cancel_layout_pairs only removes those)


def _torch_symbolic() -> Any:
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14

    return symbolic_opset14.scaled_dot_product_attention


def _const(value: Any, kind: str) -> Any:
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    if value is None or sh._is_none(value):
        return None
    if not sh._is_constant(value):
        raise _Fallback
    return sh._maybe_get_const(value, kind)


class _Fallback(Exception):
    """This call is not one the fused node covers: use torch's symbolic."""


class _Symbolic:
    """The `aten::scaled_dot_product_attention` symbolic of one trace (it caches the bias made from a mask,
    so the layers that share the model's mask share one bias)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], ...]] = []  # q/k/v shapes of each SDPA call, in trace order
        self.bias: dict[str, Any] = {}
        self.n_fused = 0
        self.n_fallback = 0

    def __call__(self, g: Any, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: Any = 0.0,
                 is_causal: Any = False, scale: Any = None, enable_gqa: Any = False) -> Any:
        try:
            out = self._fused(g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            self.n_fused += 1
            return out
        except _Fallback:
            self.n_fallback += 1
            return _torch_symbolic()(g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def _fused(self, g: Any, query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: Any, is_causal: Any,
               scale: Any, enable_gqa: Any) -> Any:
        from torch.onnx._internal.torchscript_exporter import _type_utils
        from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

        if (_const(dropout_p, "f") or 0.0) != 0.0 or _const(is_causal, "b") or _const(enable_gqa, "b"):
            raise _Fallback
        call = self.calls[self.n_fused + self.n_fallback] if self.n_fused + self.n_fallback < len(self.calls) else None
        if call is None:
            raise _Fallback
        (_, heads, _, head_dim), (_, k_heads, _, k_dim), (_, v_heads, _, v_dim) = call
        if k_heads != heads or v_heads != heads or k_dim != head_dim:
            raise _Fallback
        sizes = [sh._get_tensor_sizes(t) or [None] * 4 for t in (query, key, value)]
        if any(len(s) != 4 or s[1] not in (None, h) or s[3] not in (None, d)
               for s, h, d in zip(sizes, (heads, heads, heads), (head_dim, head_dim, v_dim), strict=True)):
            raise _Fallback  # the recorded call is not this one
        s = _const(scale, "f")
        attrs: dict[str, Any] = {"num_heads_i": heads}
        if s is not None and abs(float(s) - head_dim ** -0.5) > 1e-12 * head_dim ** -0.5:
            attrs["scale_f"] = float(s)
        bias = None
        if not sh._is_none(attn_mask):
            mask_type = _type_utils.JitScalarType.from_value(attn_mask)
            if mask_type not in (_type_utils.JitScalarType.BOOL, _type_utils.JitScalarType.FLOAT):
                raise _Fallback
            if sh._get_tensor_rank(attn_mask) not in (2, 3, 4):
                raise _Fallback
            bias = self._bias(g, attn_mask, query, key, mask_type == _type_utils.JitScalarType.BOOL)
        merged = [g.op("Reshape", g.op("Transpose", t, perm_i=[0, 2, 1, 3]),
                       g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))
                  for t in (query, key, value)]
        inputs = merged
        if bias is not None:  # inputs 3 (packed bias) and 4 (key_padding_mask) absent
            inputs = [*merged, sh._optional_input_placeholder_tensor(g), sh._optional_input_placeholder_tensor(g), bias]
        out = g.op("com.microsoft::MultiHeadAttention", *inputs, **attrs)
        out.setType(query.type().with_sizes([sizes[0][0], sizes[0][2], heads * v_dim]))
        split = g.op("Reshape", out, g.op("Constant", value_t=torch.tensor([0, 0, heads, v_dim],
                                                                         dtype=torch.int64)))
        result = g.op("Transpose", split, perm_i=[0, 2, 1, 3])
        # ONNX shape inference knows no contrib op: restore SDPA's static sizes so later layers see them
        result.setType(query.type().with_sizes([sizes[0][0], heads, sizes[0][2], v_dim]))
        return result

    def _bias(self, g: Any, mask: Any, query: Any, key: Any, is_bool: bool) -> Any:
        """The additive (B or 1, N or 1, S, L) bias of a mask, made once per mask value."""
        cached = self.bias.get(mask.debugName())
        if cached is not None:
            return cached
        if is_bool:
            zero = g.op("Constant", value_t=torch.tensor([0.0]))
            lowest = g.op("Constant", value_t=torch.tensor([_LOWEST]))
            add = g.op("Where", mask, zero, lowest)
        else:
            add = mask
        rank = len(mask.type().sizes()) if mask.type().sizes() is not None else 4
        if rank < 4:
            add = g.op("Unsqueeze", add, g.op("Constant", value_t=torch.tensor(list(range(4 - rank)),
                                                                              dtype=torch.int64)))
        one = g.op("Constant", value_t=torch.tensor([1, 1], dtype=torch.int64))
        s = g.op("Slice", g.op("Shape", query), g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64)),
                 g.op("Constant", value_t=torch.tensor([3], dtype=torch.int64)))
        L = g.op("Slice", g.op("Shape", key), g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64)),
                 g.op("Constant", value_t=torch.tensor([3], dtype=torch.int64)))
        bias = g.op("Expand", add, g.op("Concat", one, s, L, axis_i=0))
        self.bias[mask.debugName()] = bias
        return bias


class _RecordCalls(TorchFunctionMode):
    """Records the q/k/v shapes of every SDPA call while the exporter traces: the symbolic runs after the
    trace, on values whose head count the exporter's shape inference lost past the first fused node (it
    knows no contrib op), so it takes the head count and size of the i-th call from here."""

    def __init__(self, calls: list[tuple[tuple[int, ...], ...]]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append(tuple(tuple(t.shape) for t in args[:3]))
        return func(*args, **(kwargs or {}))


@contextmanager
def fused_attention(enabled: bool = True) -> Iterator[_Symbolic | None]:
    """While active, `torch.onnx.export(..., dynamo=False)` lowers SDPA calls to MultiHeadAttention."""
    if not enabled:
        yield None
        return
    sym = _Symbolic()
    torch.onnx.register_custom_op_symbolic(_SDPA, sym, _SYMBOLIC_OPSET)
    try:
        with _RecordCalls(sym.calls):
            yield sym
    finally:
        torch.onnx.unregister_custom_op_symbolic(_SDPA, _SYMBOLIC_OPSET)


# -- after export ------------------------------------------------------------------------------------
def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def prune_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is read (by a node or as a graph output); returns how many."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return removed
        removed += len(graph.node) - len(keep)
        del graph.node[:]
        graph.node.extend(keep)


def drop_untyped_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info entries without an element type (what the exporter writes after a contrib op, which
    its shape inference does not know; onnxruntime refuses to load them)."""
    keep = [vi for vi in graph.value_info if vi.type.tensor_type.elem_type != TensorProto.UNDEFINED]
    del graph.value_info[:]
    graph.value_info.extend(keep)


Dim = int | tuple[str, int]  # a static size, or (tensor, axis): the size of that axis


class _Dims:
    """Proves two axis sizes equal without running the graph: each size is traced back to a canonical
    (tensor, axis) through Transpose (permuted axis), Reshape (a 0 entry copies the input's axis; an entry
    computed from Shape/Gather/Unsqueeze/Concat is followed to the axis it was read from; a constant is a
    static size) and MultiHeadAttention (batch and sequence axes are the query's). Anything else stays
    (tensor, axis) itself, so equality is only claimed when proven."""

    def __init__(self, graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto]) -> None:
        self.producer = producer
        self.consts = {t.name: nh.to_array(t) for t in graph.initializer if len(t.dims) <= 1}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = nh.to_array(n.attribute[0].t)
        self.rank = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*graph.value_info, *graph.input]
                     if vi.type.tensor_type.HasField("shape")}

    def dim(self, t: str, i: int, depth: int = 0) -> Dim:
        node = self.producer.get(t)
        if node is None or depth > 64:
            return (t, i)
        if node.op_type == "Transpose" and (perm := _perm(node)) is not None and i < len(perm):
            return self.dim(node.input[0], perm[i], depth + 1)
        if node.op_type == "Reshape":
            items = self.items(node.input[1], depth + 1)
            if items is not None and i < len(items):
                it = items[i]
                if it == 0:
                    return self.dim(node.input[0], i, depth + 1)
                if it != -1:
                    return it
        if node.op_type == "MultiHeadAttention" and i < 2:
            return self.dim(node.input[0], i, depth + 1)
        return (t, i)

    def rank_of(self, t: str, depth: int = 0) -> int | None:
        """The tensor's rank: from value_info / graph inputs, else from a Transpose's perm, a Reshape's target
        or a MultiHeadAttention output (3)."""
        if t in self.rank:
            return self.rank[t]
        node = self.producer.get(t)
        if node is None or depth > 64:
            return None
        if node.op_type == "Transpose":
            perm = _perm(node)
            return None if perm is None else len(perm)
        if node.op_type == "Reshape":
            items = self.items(node.input[1], depth + 1)
            return None if items is None else len(items)
        return 3 if node.op_type == "MultiHeadAttention" else None

    def items(self, t: str, depth: int = 0) -> list[Dim] | None:
        """The value of a 1-D int64 shape tensor, entry by entry, or None when it cannot be followed."""
        if t in self.consts:
            return [int(v) for v in np.atleast_1d(self.consts[t])]
        node = self.producer.get(t)
        if node is None or depth > 64:
            return None
        if node.op_type == "Shape" and not node.attribute and (r := self.rank_of(node.input[0], depth)) is not None:
            return [self.dim(node.input[0], i, depth + 1) for i in range(r)]
        if node.op_type == "Gather" and node.input[1] in self.consts and not any(
                a.name == "axis" and a.i != 0 for a in node.attribute):
            idx = [int(j) for j in np.atleast_1d(self.consts[node.input[1]])]
            shape = self.producer.get(node.input[0])
            if shape is not None and shape.op_type == "Shape" and not shape.attribute and min(idx) >= 0:
                return [self.dim(shape.input[0], j, depth + 1) for j in idx]  # no rank needed
            src = self.items(node.input[0], depth + 1)
            if src is None:
                return None
            return [src[int(j)] for j in np.atleast_1d(self.consts[node.input[1]])]
        if node.op_type in ("Unsqueeze", "Squeeze", "Identity", "Cast"):
            return self.items(node.input[0], depth + 1)
        if node.op_type == "Concat":
            parts = [self.items(x, depth + 1) for x in node.input]
            return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
        return None

    def is_noop_reshape(self, node: onnx.NodeProto) -> bool:
        """A Reshape to its input's own shape: every target entry proven equal to the input's axis (0 copies
        it), except at most one -1 (which then resolves to the one axis left)."""
        x = node.input[0]
        items = self.items(node.input[1])
        if items is None or len(items) != self.rank_of(x):
            return False
        unproven = [i for i, it in enumerate(items) if it != 0 and it != self.dim(x, i)]
        return not unproven or (len(unproven) == 1 and items[unproven[0]] == -1)


def _unbind_gather(squeeze: onnx.NodeProto, p2: list[int], producer: dict[str, onnx.NodeProto],
                   shapes: _Dims) -> list[onnx.NodeProto] | None:
    """Transpose(p2) of the i-th of `Squeeze(Split(Transpose(y, p1), 1s, axis 0), axis 0)` (torch's `unbind` of a
    permuted packed q/k/v, as timm writes it) equals `Gather(y, i, axis=p1[0])` when the axes then line up
    (checked here); returns the nodes computing it, else None."""
    axes = shapes.items(squeeze.input[1]) if len(squeeze.input) > 1 else None
    split = producer.get(squeeze.input[0])
    if axes != [0] or split is None or split.op_type != "Split" or any(
            a.name == "axis" and a.i != 0 for a in split.attribute):
        return None
    sizes = shapes.items(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    if sizes is not None and any(d != 1 for d in sizes):
        return None
    if sizes is None and not any(a.name == "num_outputs" for a in split.attribute):
        return None
    first = producer.get(split.input[0])
    p1 = _perm(first) if first is not None and first.op_type == "Transpose" else None
    if p1 is None or len(p1) != len(p2) + 1:
        return None
    a = p1[0]
    order = [p1[p2[k] + 1] for k in range(len(p2))]
    if [d - (d > a) for d in order] != list(range(len(p2))):
        return None
    i = list(split.output).index(squeeze.input[0])
    out = f"{squeeze.output[0]}/{BSD_TAG}_unbind"
    idx = helper.make_node("Constant", [], [f"{out}_index"], name=f"{squeeze.name}/{BSD_TAG}_Index",
                           value=nh.from_array(np.asarray(i, dtype=np.int64)))
    return [idx, helper.make_node("Gather", [first.input[0], idx.output[0]], [out], axis=a,
                                  name=f"{squeeze.name}/{BSD_TAG}_Unbind")]


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (stable otherwise)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    nodes = list(graph.node)
    done: set[int] = set()
    order: list[int] = []

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(j)
                continue
            stack.append((j, True))
            for name in nodes[j].input:
                k = producer.get(name)
                if k is not None and k not in done:
                    stack.append((k, False))

    for i in range(len(nodes)):
        visit(i)
    copies = [nodes[i] for i in order]
    new = [onnx.NodeProto() for _ in copies]
    for dst, src in zip(new, copies, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(new)


def cancel_layout_pairs(graph: onnx.GraphProto) -> int:
    """`_cancel_once` until nothing changes; returns the number of Transposes removed."""
    total = 0
    while (n := _cancel_once(graph)) > 0:
        total += n
    return total


def _cancel_once(graph: onnx.GraphProto) -> int:
    """Remove Transpose pairs that compose to the identity (the model's head split/merge meeting the inverse
    layout change around MultiHeadAttention): readers of the second read the first's input; a `Shape` reading
    the first becomes `Gather(Shape(input), perm)` (same values), so the first is not computed for its shape
    alone. Exact: only data movement is removed. Returns the number of Transposes removed."""
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    shapes = _Dims(graph, producer)
    rename: dict[str, str] = {}
    extra_nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        if n.op_type != "Transpose" or n.output[0] in outputs:
            continue
        first = producer.get(n.input[0])
        if first is not None and first.op_type == "Reshape" and shapes.is_noop_reshape(first):
            first = producer.get(first.input[0])  # Transpose -> Reshape to its own shape -> Transpose
        p2 = _perm(n)
        if first is not None and first.op_type == "Squeeze" and p2 is not None:
            gather = _unbind_gather(first, p2, producer, shapes)
            if gather is not None:  # Transpose(unbind(Transpose(y))) -> Gather(y) (timm's packed q/k/v)
                extra_nodes.extend(gather)
                rename[n.output[0]] = gather[-1].output[0]
            continue
        p1 = _perm(first) if first is not None and first.op_type == "Transpose" else None
        if p1 is None or p2 is None or len(p1) != len(p2) or any(p1[p2[i]] != i for i in range(len(p2))):
            continue
        rename[n.output[0]] = first.input[0]
    graph.node.extend(extra_nodes)  # each reads a tensor produced earlier: appended, topologically sorted below
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    if extra_nodes:
        _toposort(graph)
    # Shape(Transpose(y, p)) -> Gather(Shape(y), p): the Transpose then feeds nothing and is dropped
    extra: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for n in list(graph.node):
        src = producer.get(n.input[0]) if n.input else None
        if n.op_type != "Shape" or src is None or src.op_type != "Transpose" or n.attribute:
            continue
        perm_name, raw = f"{n.output[0]}/{BSD_TAG}_perm", f"{n.output[0]}/{BSD_TAG}_unpermuted"
        perm = helper.make_node("Constant", [], [perm_name], name=f"{n.name}/{BSD_TAG}_PermConst",
                                value=nh.from_array(np.asarray(_perm(src), dtype=np.int64)))
        extra.append((n, [perm, helper.make_node("Shape", [src.input[0]], [raw], name=f"{n.name}/{BSD_TAG}_Shape"),
                          helper.make_node("Gather", [raw, perm_name], [n.output[0]], name=f"{n.name}/{BSD_TAG}_Perm",
                                           axis=0)]))
    if extra:
        swap = {old.output[0]: new for old, new in extra}
        nodes = []
        for n in graph.node:
            nodes.extend(swap.get(n.output[0], [n]) if n.op_type == "Shape" else [n])
        del graph.node[:]
        graph.node.extend(nodes)
    before = sum(1 for n in graph.node if n.op_type == "Transpose")
    prune_dead_nodes(graph)
    return before - sum(1 for n in graph.node if n.op_type == "Transpose")


def count_fused(proto: onnx.ModelProto) -> int:
    """MultiHeadAttention nodes in a graph."""
    return sum(1 for n in proto.graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN)
