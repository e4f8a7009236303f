"""Exact memory accounting of a plan, before any tensor is touched.

Bytes of the deployable weights: every unit after structured pruning, its low-rank factors, its
sparse layout (values + bitmask or 2:4 indices) and its precision (packed codes + fp32 scales);
biases, norms and the remaining embeddings in fp32; shared modules counted once. It mirrors
`apply_plan` and equals the bytes of `pack_model` on the compressed model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimformer.compression.modules import WeightFormat, matrix_bytes, sparse_format
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.plan_semantics import canonical_plan, effective_rank, scope_paths, unit_in_scope
from slimformer.models.base import ModelAdapter, Unit

GROUPS = ("embeddings", "attention", "ffn", "other")
ATTENTION_ROLES = ("query", "key", "value", "qkv", "attn_out")


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of a plan's deployable weights, broken down by group and unit."""

    total_bytes: int
    fp32_bytes: int
    by_group: dict[str, int] = field(default_factory=dict)
    per_unit: dict[str, int] = field(default_factory=dict)

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
        if unit.role in ("query", "key", "value"):
            out_f = dim
        elif unit.role == "qkv":
            out_f = 3 * dim
        elif unit.role == "attn_out":
            in_f = dim
    if ls.neurons_kept is not None:
        if unit.role == "ffn_in":
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
    rank = effective_rank(spec, shape)
    if rank is None:
        return stored_matrix_bytes(shape, spec) + bias
    if unit.kind == "embedding":  # table (V, r) and projection stored as (dim, r)
        return stored_matrix_bytes((out_f, rank), spec) + stored_matrix_bytes((in_f, rank), spec)
    return stored_matrix_bytes((rank, in_f), spec) + stored_matrix_bytes((out_f, rank), spec) + bias


def group_of(unit: Unit) -> str:
    if unit.role == "embedding":
        return "embeddings"
    return "attention" if unit.role in ATTENTION_ROLES else "ffn"


def plan_memory(adapter: ModelAdapter, plan: CompressionPlan) -> MemoryReport:
    """Exact deployable bytes of `plan` on `adapter`'s model (fp32 reference alongside)."""
    plan = canonical_plan(adapter, plan)
    scope = plan.sharing.scope
    shared_away = {j for g in plan.sharing.groups for j in g[1:]}
    by_group = dict.fromkeys(GROUPS, 0)
    fp32 = 0
    per_unit: dict[str, int] = {}
    for u in adapter.units:
        fp32 += 4 * u.params
        if u.layer in shared_away and unit_in_scope(u, adapter.layers[u.layer], scope):
            per_unit[u.name] = 0
            continue
        b = unit_bytes(u, unit_shape(adapter, u, plan), plan.unit(u.name))
        per_unit[u.name] = b
        by_group[group_of(u)] += b
    for p in _other_params(adapter):
        fp32 += 4 * p.numel
        if p.layer in shared_away:
            info = adapter.layers[p.layer]
            if any(p.path.startswith(s + ".") for s in scope_paths(info, scope)):
                continue
        by_group[p.group] += 4 * p.numel
    return MemoryReport(sum(by_group.values()), fp32, by_group, per_unit)
