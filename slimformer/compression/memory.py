"""Exact memory accounting of a plan, before any tensor is touched.

Bytes of the deployable weights: every unit after structured pruning, its low-rank factors, its
sparse layout (values + bitmask or 2:4 indices) and its precision (packed codes + fp32 scales);
biases, norms and the remaining embeddings in fp32; shared modules counted once. It mirrors
`apply_plan` and equals the bytes of `pack_model` on the compressed model.

Deploy targets (`budget.memory` applies to the artifact the user deploys, search config `deploy`):
  safetensors  the packed tensors above, exactly (`slimformer.safetensors`);
  onnx         an upper bound of the `onnx/model.onnx` file `apply --onnx` writes (exact kernels): every
               matrix as its ONNX kernel stores it (MatMulNBits blocks padded to a power of two with their
               scales repeated/re-blocked; int4 tables without an exact block as int8 codes; sparse
               matrices dense, since ORT's CPU kernels are dense) plus the graph's own bytes: the fp32
               export's bytes beyond its weights (protobuf nodes, names, shape constants, buffers; measured
               once per model by the caller, `set_deploy`) and a per-kernel bound on the nodes and names a
               low-bit kernel or a low-rank factorisation adds (linear in the module path's length, fitted
               with margin on tiny BERTs and all-MiniLM-L6-v2; tests check it never under-estimates).
               3-bit units (and 2-bit ones without a power-of-two block) as their packed bit stream, scales
               and unpacking constants (export.kernels.unpack_codes).
               Units with `kernel: int8` (DynamicQuantizeMatMul) are priced as that kernel stores them
               (codes padded to whole groups, scales, smoothing factors: whether or not the unit has
               `smooth`); `--kernels fast` overrides every unit the same way.
A unit with `smooth` (SmoothQuant, compression/smoothing.py) also packs its factors: 4 bytes per input feature
(plus 4 per rank for a low-rank unit's `up` factor, which smooths with ones), in both targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimformer.compression.embedding_tiers import onnx_tiered_bytes, tiered_bytes
from slimformer.compression.modules import WeightFormat, matrix_bytes, sparse_format
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.plan_semantics import canonical_plan, effective_rank, scope_paths, unit_in_scope
from slimformer.models.base import ModelAdapter, Unit

GROUPS = ("embeddings", "attention", "ffn", "other")
ATTENTION_ROLES = ("query", "key", "value", "qkv", "attn_out")
DeployTarget = Literal["safetensors", "onnx"]
DEPLOY_TARGETS: tuple[str, ...] = ("safetensors", "onnx")
_MIN_BLOCK, _MAX_BLOCK = 16, 256  # MatMulNBits / GatherBlockQuantized blocks (export.kernels; a test keeps them equal)
# graph bytes a kernel adds beyond its initializers: (fixed, per character of the module path); bounds of
# the nodes/value names measured on tiny BERTs and MiniLM (DequantizeLinear+Gemm: 6 nodes naming the path ~16x)
_FILE_SLACK = 2048  # metadata_props (~300 bytes, not in the fp32 measurement), varint widths, opset imports
_KERNEL_GRAPH = {"matmulnbits": (160, 6), "dequant_gemm": (400, 18), "fp16": (200, 6),
                 "gather_block_quantized": (160, 6), "gather_dequant": (400, 18), "lowrank": (400, 16),
                 "dynamic_int8": (1400, 56),  # unit kernel int8: ~16 weight-folding nodes + DynamicQuantizeMatMul
                 "unpack_gemm": (1400, 48)}  # 3/2-bit bit stream: 12 unpacking nodes + DequantizeLinear+Gemm


@dataclass(frozen=True)
class DeploySetting:
    """What `plan_memory` prices for an adapter: the target and, for onnx, the fp32 export's graph bytes."""

    target: DeployTarget = "safetensors"
    graph_bytes: int = 0  # bytes of the fp32 ONNX file beyond the fp32 weights plan_memory counts


def set_deploy(adapter: ModelAdapter, target: DeployTarget, graph_bytes: int = 0) -> None:
    """Make `plan_memory(adapter, ...)` price `target` (the search sets this once from its config's `deploy`;
    for onnx, `graph_bytes` comes from `slimformer.export.graph_overhead_bytes`)."""
    if target not in DEPLOY_TARGETS:
        raise ValueError(f"deploy must be one of {', '.join(DEPLOY_TARGETS)} (got {target!r})")
    adapter._deploy_setting = DeploySetting(target, max(0, int(graph_bytes)))  # type: ignore[attr-defined]


def deploy_setting(adapter: ModelAdapter) -> DeploySetting:
    return getattr(adapter, "_deploy_setting", None) or DeploySetting()


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of a plan's deployable weights, broken down by group and unit."""

    total_bytes: int
    fp32_bytes: int
    by_group: dict[str, int] = field(default_factory=dict)
    per_unit: dict[str, int] = field(default_factory=dict)
    deploy: str = "safetensors"  # what total_bytes prices: the packed tensors, or the ONNX file (upper bound)

    @property
    def fraction(self) -> float:
        return self.total_bytes / self.fp32_bytes

    @property
    def percent(self) -> float:
        return 100.0 * self.fraction


@dataclass(frozen=True)
class _OtherParam:
    path: str
    numel: int
    group: str
    layer: int | None


def _other_params(adapter: ModelAdapter) -> list[_OtherParam]:
    """Parameters outside the units (norms, position embeddings, heads...), computed once per adapter."""
    cached = getattr(adapter, "_other_params_cache", None)
    if cached is not None:
        return cached
    unit_names = set(adapter.unit_names)
    emb_parents = {u.name.rpartition(".")[0] for u in adapter.units if u.role == "embedding"}
    out: list[_OtherParam] = []
    seen: set[int] = set()
    for path, p in adapter.model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        owner = path.rpartition(".")[0]
        if owner in unit_names:
            continue
        group, layer = "other", None
        for info in adapter.layers:
            if path.startswith(info.path + "."):
                layer = info.index
                if any(path.startswith(s + ".") for s in info.attention_scope):
                    group = "attention"
                elif any(path.startswith(s + ".") for s in info.ffn_scope):
                    group = "ffn"
                break
        if layer is None and any(e and path.startswith(e + ".") for e in emb_parents):
            group = "embeddings"
        out.append(_OtherParam(path, p.numel(), group, layer))
    adapter._other_params_cache = out  # type: ignore[attr-defined]
    return out


def unit_shape(adapter: ModelAdapter, unit: Unit, plan: CompressionPlan) -> tuple[int, int]:
    """(out, in) of a unit after head and neuron pruning."""
    out_f, in_f = unit.shape
    if unit.layer is None:
        return out_f, in_f
    info = adapter.layers[unit.layer]
    ls = plan.layer(unit.layer)
    if ls.heads_kept is not None:
        dim = ls.heads_kept * info.head_dim
        if unit.role in ("query", "key", "value", "qkv"):  # key/value: kept KV groups under grouped-query attention
            out_f = out_f * ls.heads_kept // info.num_heads
        elif unit.role == "attn_out":
            in_f = dim
    if ls.neurons_kept is not None:
        if unit.role in ("ffn_in", "ffn_gate"):
            out_f = ls.neurons_kept
        elif unit.role == "ffn_out":
            in_f = ls.neurons_kept
    return out_f, in_f


def stored_matrix_bytes(shape: tuple[int, int], spec: UnitSpec) -> int:
    numel = shape[0] * shape[1]
    if spec.sparsity == 0:
        nnz, fmt_sparse = numel, "dense"
    elif spec.pattern == "2:4":
        nnz, fmt_sparse = numel // 2, "2:4"
    else:
        nnz = numel - round(spec.sparsity * numel)
        fmt_sparse = sparse_format(numel, nnz, spec.bits, spec.pattern)
    fmt = WeightFormat(spec.bits, spec.group_size if spec.quantized else None, fmt_sparse)  # type: ignore[arg-type]
    return matrix_bytes(shape, fmt, nnz)


def unit_bytes(unit: Unit, shape: tuple[int, int], spec: UnitSpec) -> int:
    out_f, in_f = shape
    bias = 4 * out_f if unit.has_bias else 0
    if spec.is_identity:
        return 4 * out_f * in_f + bias
    if spec.tiers is not None:  # rank map + each tier's codes and scales (embedding_tiers.py)
        return tiered_bytes(shape, spec.tiers)
    rank = effective_rank(spec, shape)
    if spec.smooth is not None:  # SmoothQuant factors: fp32, one per input feature, packed beside the weight
        bias += 4 * in_f
    if rank is None:
        return stored_matrix_bytes(shape, spec) + bias
    if unit.kind == "embedding":  # table (V, r) and projection stored as (dim, r)
        return stored_matrix_bytes((out_f, rank), spec) + stored_matrix_bytes((in_f, rank), spec)
    if spec.smooth is not None:  # the `up` factor's unit factors (compression/smoothing.py)
        bias += 4 * rank
    return stored_matrix_bytes((rank, in_f), spec) + stored_matrix_bytes((out_f, rank), spec) + bias


# -- ONNX layout (exact kernels, slimformer.export.kernels) ------------------------------------------
def _nbits_block(k: int, group: int | None, bits: int) -> int | None:
    """Same rule as export.kernels.nbits_block (compression cannot import export)."""
    if group is not None and group < k:
        b = group & -group
        return min(b, _MAX_BLOCK) if b >= _MIN_BLOCK else None
    best, best_bytes, b = _MIN_BLOCK, None, _MIN_BLOCK
    while b <= _MAX_BLOCK:
        cost = -(-k // b) * (b * bits // 8 + 4)
        if best_bytes is None or cost <= best_bytes:
            best, best_bytes = b, cost
        b *= 2
    return best


def onnx_matrix(shape: tuple[int, int], spec: UnitSpec, table: bool) -> tuple[int, str | None]:
    """(initializer bytes, kernel kind) of one (rows, cols) matrix in the ONNX export: a linear's weight
    (rows = out, cols = in) or an embedding table (rows = vocab); sparse matrices are dense there."""
    n, k = shape
    bits = spec.bits
    if bits == 32:
        return 4 * n * k, None
    if bits == 16:
        return 2 * n * k, "fp16"
    group = spec.group_size if spec.quantized else None
    per_row = group is None or group >= k
    n_groups = 1 if per_row else -(-k // group)  # type: ignore[operator]
    block = _nbits_block(k, group, bits)
    if table:
        if (bits == 8 and per_row) or block is None or (bits == 4 and k % 2):  # int8 codes + Gather/Cast/Mul
            return n * k + 4 * n * n_groups + (8 * k if n_groups > 1 else 0), "gather_dequant"
        nb = -(-k // block)
        return n * ((k + k % 2) * bits // 8) + 4 * n * nb, "gather_block_quantized"
    if spec.kernel == "int8":  # DynamicQuantizeMatMul: stored codes padded to whole groups, scales, smoothing
        kp = n_groups * (k if per_row else group)  # type: ignore[operator]
        codes = (n * kp + 1) // 2 if bits == 4 else n * kp
        return codes + 4 * n * n_groups + 4 * k + 128, "dynamic_int8"
    if bits == 3 or (bits == 2 and block is None):  # packed bits + scales + the unpacking constants (export)
        return (n * k * bits + 7) // 8 + 4 * n * n_groups + 200, "unpack_gemm"
    if block is not None and not (bits == 8 and per_row):
        nb = -(-k // block)
        return n * nb * block * bits // 8 + 4 * n * nb, "matmulnbits"
    codes = (n * k + 1) // 2 if bits == 4 else n * k
    return codes + 4 * n * n_groups + 24, "dequant_gemm"  # + the two int64 shape constants


def _graph_bytes(kind: str | None, path: str) -> int:
    if kind is None:
        return 0
    fixed, per_char = _KERNEL_GRAPH[kind]
    return fixed + per_char * (len(path) + 8)  # + ".weight"/".useN" style suffixes


def onnx_unit_bytes(unit: Unit, shape: tuple[int, int], spec: UnitSpec) -> tuple[int, int]:
    """(initializer bytes, graph bytes) of one unit in the ONNX export (upper bounds)."""
    out_f, in_f = shape
    bias = 4 * out_f if unit.has_bias else 0
    table = unit.kind == "embedding"
    rank = None if spec.is_identity else effective_rank(spec, shape)
    if spec.is_identity:
        return 4 * out_f * in_f + bias, 0
    if spec.tiers is not None:
        return onnx_tiered_bytes(shape, spec.tiers, unit.name)
    if rank is None:
        b, kind = onnx_matrix((out_f, in_f), spec, table)
        return b + bias, _graph_bytes(kind, unit.name)
    if table:  # table (V, r) gathered, projection (dim, r) a linear of in r, out dim
        parts = [onnx_matrix((out_f, rank), spec, True), onnx_matrix((in_f, rank), spec, False)]
    else:
        parts = [onnx_matrix((rank, in_f), spec, False), onnx_matrix((out_f, rank), spec, False)]
    graph = _graph_bytes("lowrank", unit.name) + sum(_graph_bytes(k, unit.name) for _, k in parts)
    return sum(b for b, _ in parts) + bias, graph


def tied_head_onnx_bytes(unit: Unit, shape: tuple[int, int], spec: UnitSpec) -> int:
    """Bytes the ONNX export adds for a tied LM head reading a compressed table (upper bound): the table again
    as a linear kernel (vocab out, dim in) with its nodes, and a factorised table's projection in fp32."""
    if spec.is_identity:
        return 0  # the fp32 table is one initializer read by the Gather and the head's Einsum
    rank = effective_rank(spec, shape)
    rows = shape[1] if rank is None else rank
    b, kind = onnx_matrix((shape[0], rows), spec, False)
    extra = 0 if rank is None else 4 * shape[1] * rank + _graph_bytes("lowrank", unit.name)
    return b + extra + _graph_bytes(kind, unit.name + ".head")


def deployed_unit_bytes(adapter: ModelAdapter, unit: Unit, shape: tuple[int, int], spec: UnitSpec) -> int:
    """`unit_bytes` for the adapter's deploy target (onnx: initializers and graph bytes of its kernels)."""
    if deploy_setting(adapter).target == "onnx":
        return sum(onnx_unit_bytes(unit, shape, spec))
    return unit_bytes(unit, shape, spec)


def group_of(unit: Unit) -> str:
    if unit.role in ("embedding", "lm_head"):
        return "embeddings"
    return "attention" if unit.role in ATTENTION_ROLES else "ffn"


def plan_memory(adapter: ModelAdapter, plan: CompressionPlan, deploy: DeployTarget | None = None) -> MemoryReport:
    """Deployable bytes of `plan` on `adapter`'s model (fp32 reference alongside): exact for safetensors,
    an upper bound of the file for onnx. `deploy` None: the adapter's setting (`set_deploy`; safetensors)."""
    setting = deploy_setting(adapter)
    target = deploy or setting.target
    onnx = target == "onnx"
    graph = setting.graph_bytes + _FILE_SLACK if onnx else 0
    plan = canonical_plan(adapter, plan)
    scope = plan.sharing.scope
    shared_away = {j for g in plan.sharing.groups for j in g[1:]}
    by_group = dict.fromkeys(GROUPS, 0)
    fp32 = 0
    per_unit: dict[str, int] = {}
    for u in adapter.units:
        fp32 += 4 * u.params
        shape, spec = unit_shape(adapter, u, plan), plan.unit(u.name)
        if onnx:  # every use has its nodes, even of a shared module
            b, g = onnx_unit_bytes(u, shape, spec)
            graph += g
            if u.role == "embedding" and adapter.output_shares_embedding:
                b += tied_head_onnx_bytes(u, shape, spec)
        if u.layer in shared_away and unit_in_scope(u, adapter.layers[u.layer], scope):
            per_unit[u.name] = 0
            continue
        if not onnx:
            b = unit_bytes(u, shape, spec)
        per_unit[u.name] = b
        by_group[group_of(u)] += b
    for p in _other_params(adapter):
        fp32 += 4 * p.numel
        if p.layer in shared_away:
            info = adapter.layers[p.layer]
            if any(p.path.startswith(s + ".") for s in scope_paths(info, scope)):
                continue
        by_group[p.group] += 4 * p.numel
    by_group["other"] += graph
    return MemoryReport(sum(by_group.values()), fp32, by_group, per_unit, target)
