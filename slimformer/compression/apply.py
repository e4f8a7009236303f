"""Apply a CompressionPlan to a fresh copy of the adapter's model.

Order of application (documented in docs/ARCHITECTURE.md):
  1. sharing     - each group's first layer supplies the modules of the shared scope to the others;
  2. structure   - attention heads and FFN neurons pruned (matrices shrink), ranked by weight norms or by
                   their contribution on calibration data; the following projection optionally re-fitted
                   by least squares (compression/structure.py);
  3. low rank    - truncated SVD (optionally activation-weighted) into two factors;
  4. sparsity    - magnitude (unstructured) or 2:4 masks on each stored matrix;
  5. precision   - fp16 rounding or symmetric int8/int4 per channel or per group, masks kept.
Shared modules are compressed once. Units whose spec is the identity are left untouched, so the
identity plan reproduces the original outputs exactly.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from slimformer.compression import ops
from slimformer.compression import structure as st
from slimformer.compression.calibration import (  # noqa: F401
    StructureStats,
    collect_activation_scales,
    collect_hessians,
)
from slimformer.compression.embedding_tiers import TieredEmbedding
from slimformer.compression.gptq import gptq_quantize, gptq_search, inverse_hessian
from slimformer.compression.modules import (
    FactorizedEmbedding,
    LowRankLinear,
    SlimEmbedding,
    SlimLinear,
    WeightFormat,
    sparse_format,
)
from slimformer.compression.plan import CompressionPlan, LayerSpec, StructureSpec, UnitSpec
from slimformer.compression.plan_semantics import (
    canonical_plan,
    effective_rank,
    layer_path_swap,
    scope_paths,
    unit_in_scope,
)
from slimformer.compression.reconstruct import reconstruct
from slimformer.compression.smoothing import smooth_units
from slimformer.errors import PlanError
from slimformer.models.base import LayerInfo, ModelAdapter, Unit


class DecompositionCache:
    """SVDs computed once per (weights, activation scale) and reused by every trial; also the finished
    compressed module of each (unit, spec, layer structure), which is a pure function of the reference
    weights, so later trials copy it instead of re-quantising (bounded by `max_unit_bytes`)."""

    def __init__(self, max_unit_bytes: int = 2 * 1024**3) -> None:
        self._store: dict[tuple[str, str], ops.SVDResult] = {}
        self._units: OrderedDict[tuple[Any, ...], tuple[nn.Module, int]] = OrderedDict()
        self._hinv: dict[tuple[str, str], Tensor | None] = {}
        self._refits: dict[tuple[str, ...], tuple[Tensor, Tensor | None]] = {}
        self._unit_bytes = 0
        self.max_unit_bytes = max_unit_bytes
        self.hits = 0
        self.misses = 0
        self.unit_hits = 0

    def inverse_hessian(self, h: Tensor) -> Tensor | None:
        """GPTQ's inverse-Hessian factor, computed once per Hessian (shared by every bits/group choice)."""
        key = ("hinv", self._key(h))
        if key not in self._hinv:
            self._hinv[key] = inverse_hessian(h)
        return self._hinv[key]

    def refit(self, unit: str, w: Tensor, bias: Tensor | None, keep: Tensor, stats: StructureStats
              ) -> tuple[Tensor, Tensor | None]:
        """The least-squares re-fit of a projection to its kept inputs, once per (weights, kept set, data)."""
        key = (unit, self._key(w), self._key(bias), self._key(keep), stats.fingerprint)
        if key not in self._refits:
            self._refits[key] = st.refit_projection(w, bias, keep, stats.moments[unit])
        return self._refits[key]

    def get_unit(self, key: tuple[Any, ...]) -> nn.Module | None:
        item = self._units.get(key)
        if item is None:
            return None
        self._units.move_to_end(key)
        self.unit_hits += 1
        return copy.deepcopy(item[0])

    def put_unit(self, key: tuple[Any, ...], module: nn.Module) -> None:
        size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        if size > self.max_unit_bytes:
            return
        self._units[key] = (copy.deepcopy(module), size)
        self._unit_bytes += size
        while self._unit_bytes > self.max_unit_bytes:
            _, (_, old) = self._units.popitem(last=False)
            self._unit_bytes -= old

    @staticmethod
    def _key(t: Tensor | None) -> str:
        if t is None:
            return "-"
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def svd(self, w: Tensor, act_scale: Tensor | None) -> ops.SVDResult:
        key = (self._key(w), self._key(act_scale))
        res = self._store.get(key)
        if res is None:
            self.misses += 1
            res = ops.svd(w, act_scale)
            self._store[key] = res
        else:
            self.hits += 1
        return res

    def __len__(self) -> int:
        return len(self._store)


# -- module tree helpers ---------------------------------------------------------------------------
def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


# -- transforms ------------------------------------------------------------------------------------
def _prune_heads(model: nn.Module, info: LayerInfo, keep: Tensor) -> None:
    """Keep query heads `keep`; under grouped-query attention `keep` is whole KV groups (key/value keep
    those groups' heads)."""
    hd = info.head_dim
    idx = (keep[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    if len(info.qkv_units) == 1:  # fused [3, heads, head_dim] rows
        full = info.num_heads * hd
        _select_rows(model, info.qkv_units[0], torch.cat([idx + k * full for k in range(3)]))
    else:
        kv_keep = keep[::info.kv_group] // info.kv_group
        kv_idx = (kv_keep[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
        for i, name in enumerate(info.qkv_units):
            _select_rows(model, name, idx if i == 0 else kv_idx)
    _select_cols(model, info.attn_out_unit, idx)
    attn = get_module(model, info.attention_path)
    setattr(attn, info.heads_attr, int(keep.numel()))
    for attr in ("all_head_size", "attn_dim", "split_size"):  # split_size: GPT-2 splits its fused qkv by it
        if hasattr(attn, attr):
            setattr(attn, attr, int(keep.numel()) * hd)
    params = list(inspect.signature(attn.forward).parameters)
    if "position_bias" in params:  # MPNet: one (batch, heads, q, k) bias for all layers, computed outside
        attn.register_forward_pre_hook(_KeptHeadBias(keep, info.num_heads, params.index("position_bias")),
                                       with_kwargs=True)


class _KeptHeadBias:
    """Forward pre-hook of a head-pruned attention module: slice the shared per-head `position_bias`
    to the heads this layer kept."""

    def __init__(self, keep: Tensor, num_heads: int, pos: int) -> None:
        self.keep, self.num_heads, self.pos = keep, num_heads, pos

    def _cut(self, t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] == self.num_heads:
            return t.index_select(1, self.keep.to(t.device))
        return t

    def __call__(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "position_bias" in kwargs:
            kwargs = {**kwargs, "position_bias": self._cut(kwargs["position_bias"])}
        elif len(args) > self.pos:
            args = (*args[:self.pos], self._cut(args[self.pos]), *args[self.pos + 1:])
        return args, kwargs


def _select_rows(model: nn.Module, path: str, idx: Tensor) -> None:
    old = get_module(model, path)
    new = nn.Linear(old.in_features, idx.numel(), bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight[idx])
        if old.bias is not None:
            new.bias.copy_(old.bias[idx])
    set_module(model, path, new)


def _select_cols(model: nn.Module, path: str, idx: Tensor) -> None:
    old = get_module(model, path)
    new = nn.Linear(idx.numel(), old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, idx])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    set_module(model, path, new)


def _weight_format(spec: UnitSpec, shape: tuple[int, int], nnz: int) -> WeightFormat:
    numel = shape[0] * shape[1]
    return WeightFormat(spec.bits, spec.group_size if spec.quantized else None,
                        sparse_format(numel, nnz, spec.bits, spec.pattern) if spec.sparsity > 0 else "dense")


def _mask(w: Tensor, spec: UnitSpec) -> Tensor | None:
    if spec.sparsity == 0:
        return None
    return ops.mask_2_4(w) if spec.pattern == "2:4" else ops.magnitude_mask(w, spec.sparsity)


def _store(target: SlimLinear | SlimEmbedding, w: Tensor, spec: UnitSpec, hessian: Tensor | None = None,
           cache: DecompositionCache | None = None) -> None:
    mask = _mask(w, spec)
    nnz = w.numel() if mask is None else int(mask.sum())
    quant = None
    if spec.needs_hessian and hessian is not None:
        hinv = None if cache is None else cache.inverse_hessian(hessian)
        rounding = {"gptq": gptq_quantize, "gptq-ao": gptq_search, "recon": reconstruct}[spec.method]
        quant = rounding(w, hessian, spec.bits, spec.group_size, mask, hinv=hinv)
    target.set_weight(w, mask, _weight_format(spec, tuple(w.shape), nnz), quant=quant)
    if isinstance(target, SlimLinear):
        target.kernel = spec.kernel  # how it computes: exact fp32 or the int8 GEMM the exporter emits for it


def _compress_linear(model: nn.Module, unit: Unit, spec: UnitSpec, cache: DecompositionCache,
                     act_scale: Tensor | None, hessian: Tensor | None = None) -> None:
    old = get_module(model, unit.name)
    w = old.weight.detach()
    bias = old.bias
    shape = (w.shape[0], w.shape[1])
    rank = effective_rank(spec, shape)
    if rank is not None:
        a, b = ops.lowrank_factors(cache.svd(w, act_scale), rank)
        new: nn.Module = LowRankLinear(shape[1], shape[0], rank, bias=bias is not None)
        _store(new.down, b, spec, hessian, cache)
        h_up = None if hessian is None else new.down.weight @ hessian.to(w.dtype) @ new.down.weight.T
        _store(new.up, a, spec, h_up, cache)
        target_bias = new.up.bias
    else:
        new = SlimLinear(shape[1], shape[0], bias=bias is not None)
        _store(new, w, spec, hessian, cache)
        target_bias = new.bias
    if bias is not None:
        with torch.no_grad():
            target_bias.copy_(bias.detach())
    set_module(model, unit.name, new.to(w.device))


def _compress_embedding(model: nn.Module, unit: Unit, spec: UnitSpec, cache: DecompositionCache) -> None:
    old = get_module(model, unit.name)
    w = old.weight.detach()
    pad = old.padding_idx
    rank = effective_rank(spec, (w.shape[0], w.shape[1]))
    if spec.tiers is not None:  # per-row precision tiers by token frequency
        new: nn.Module = TieredEmbedding(w.shape[0], w.shape[1], spec.tiers, padding_idx=pad)
        new.set_table(w)
    elif rank is not None:
        a, b = ops.lowrank_factors(cache.svd(w, None), rank)
        new = FactorizedEmbedding(w.shape[0], w.shape[1], rank, padding_idx=pad)
        _store(new.table, a, spec)
        _store(new.proj, b.t().contiguous(), spec)
    else:
        new = SlimEmbedding(w.shape[0], w.shape[1], padding_idx=pad)
        _store(new, w, spec)
    set_module(model, unit.name, new.to(w.device))


@torch.no_grad()
def apply_plan(adapter: ModelAdapter, plan: CompressionPlan, cache: DecompositionCache | None = None,
               act_scales: dict[str, Tensor] | None = None, model: nn.Module | None = None,
               hessians: dict[str, Tensor] | None = None, rtn_fallback: bool = False,
               structure_stats: StructureStats | None = None, act_max: dict[str, Tensor] | None = None
               ) -> nn.Module:
    """A freshly compressed copy of the adapter's model (the reference model is never touched).

    act_scales (from `collect_activation_scales`) switches low rank to the activation-weighted SVD;
    hessians (from `collect_hessians`) are required by linear units whose spec says a data-aware method (gptq,
    gptq-ao, recon), and
    structure_stats (from `collect_structure_stats`) by plans whose `structure` is data-driven, and act_max (from
    `collect_input_abs_max`) by units with `smooth` (SmoothQuant, compression/smoothing.py), unless
    `rtn_fallback` (used when the values are about to be overwritten, e.g. loading a saved model).
    """
    plan = canonical_plan(adapter, plan)
    cache = DecompositionCache() if cache is None else cache  # an empty cache is falsy (__len__)
    model = adapter.fresh_model() if model is None else model
    scope = plan.sharing.scope
    shared_away: set[int] = set()  # layers whose scope modules come from their representative
    for g in plan.sharing.groups:
        rep = adapter.layers[g[0]]
        for j in g[1:]:
            other = adapter.layers[j]
            for p in scope_paths(rep, scope):
                set_module(model, layer_path_swap(p, rep, other), get_module(model, p))
            shared_away.add(j)

    structure = plan.structure
    if structure.needs_data and structure_stats is None:
        if not rtn_fallback:
            raise PlanError(f"structure importance {structure.importance!r} / refit {structure.refit} needs "
                            "calibration data (structure_stats); pass calibration batches or use importance "
                            "weight, refit false")
        structure = StructureSpec()  # shapes are what matter: the values are about to be overwritten
    in_index = _apply_structure(model, adapter, plan, structure, structure_stats, shared_away, cache)

    done: set[int] = set()
    for unit in adapter.units:
        spec = plan.unit(unit.name)
        if spec.is_identity:
            continue
        mod = get_module(model, unit.name)
        if id(mod) in done:
            continue
        scale = None if act_scales is None or unit.kind == "embedding" else act_scales.get(unit.name)
        hessian = None
        if spec.needs_hessian and unit.kind == "linear":
            hessian = None if hessians is None else hessians.get(unit.name)
            if hessian is None and not rtn_fallback:
                raise PlanError(f"{unit.name}: method {spec.method} needs calibration data (hessians); pass "
                                "calibration batches or use method rtn")
        key = (adapter.weights_sha256(), unit.name, spec, _layer_key(plan, unit, structure, structure_stats),
               DecompositionCache._key(scale), hessian is not None)
        cached = cache.get_unit(key)
        if cached is not None:
            set_module(model, unit.name, cached.to(next(mod.parameters()).device))
        else:
            if unit.kind == "embedding":
                _compress_embedding(model, unit, spec, cache)
            else:
                if unit.name in in_index:
                    idx = in_index[unit.name]
                    scale = None if scale is None else scale[idx]
                    hessian = None if hessian is None else hessian[idx][:, idx]
                _compress_linear(model, unit, spec, cache, scale, hessian)
            cache.put_unit(key, get_module(model, unit.name))
        done.add(id(get_module(model, unit.name)))
        _realias(model, adapter, plan, unit, shared_away)
    smooth_units(model, adapter, plan, act_max, in_index, rtn_fallback)  # after all units: q/k/v share factors
    return model.eval()


def _layer_key(plan: CompressionPlan, unit: Unit, structure: StructureSpec,
               stats: StructureStats | None) -> tuple[Any, ...] | None:
    """What a unit's compressed module depends on besides its spec: its layer's structure and, when that
    prunes, how (importance, re-fit) and on which calibration data."""
    if unit.layer is None:
        return None
    ls = plan.layer(unit.layer)
    if ls == LayerSpec():
        return (ls,)
    return ls, structure, stats.fingerprint if structure.needs_data and stats is not None else None


def _apply_structure(model: nn.Module, adapter: ModelAdapter, plan: CompressionPlan, structure: StructureSpec,
                     stats: StructureStats | None, shared_away: set[int], cache: DecompositionCache
                     ) -> dict[str, Tensor]:
    """Prune heads and neurons layer by layer; returns the kept input columns of each projection that
    reads them (attention output, FFN output), for slicing their activation scales and Hessians."""
    scope = plan.sharing.scope
    data = structure.importance == "activation" and stats is not None
    in_index: dict[str, Tensor] = {}
    for info in adapter.layers:
        ls = plan.layer(info.index)
        skip_attn = info.index in shared_away and scope in ("attention", "block")
        skip_ffn = info.index in shared_away and scope in ("ffn", "block")
        if ls.heads_kept is not None and ls.heads_kept < info.num_heads and not skip_attn:
            out = get_module(model, info.attn_out_unit)
            if data:
                scores = st.head_scores(out.weight, stats.moments[info.attn_out_unit], info.num_heads,  # type: ignore[union-attr]
                                        centered=structure.refit and out.bias is not None)
            else:
                q = [get_module(model, n).weight for n in info.qkv_units]
                if info.kv_group > 1:  # k/v have fewer heads: rank query heads by q rows and output columns
                    q = q[:1]
                scores = ops.head_importance(q if len(info.qkv_units) > 1 else q[0], out.weight, info.num_heads,
                                             fused_qkv=len(info.qkv_units) == 1)
            if info.kv_group > 1:  # grouped-query attention: keep the KV groups whose heads score highest
                groups = ops.top_k_sorted(scores.reshape(-1, info.kv_group).sum(1), ls.heads_kept // info.kv_group)
                keep = (groups[:, None] * info.kv_group + torch.arange(info.kv_group)[None, :]).reshape(-1)
            else:
                keep = ops.top_k_sorted(scores, ls.heads_kept)
            hd = info.head_dim
            idx = (keep[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            in_index[info.attn_out_unit] = idx
            _prune_heads(model, info, keep)
            if structure.refit and stats is not None:
                _refit(model, info.attn_out_unit, out, idx, stats, cache)
        if ls.neurons_kept is not None and ls.neurons_kept < info.intermediate and not skip_ffn:
            w_in = get_module(model, info.ffn_in_unit).weight
            out = get_module(model, info.ffn_out_unit)
            if data:
                scores = st.neuron_scores(out.weight, stats.moments[info.ffn_out_unit],  # type: ignore[union-attr]
                                          centered=structure.refit and out.bias is not None)
            else:
                scores = ops.neuron_importance(w_in, out.weight)
            keep = ops.top_k_sorted(scores, ls.neurons_kept)
            in_index[info.ffn_out_unit] = keep
            _select_rows(model, info.ffn_in_unit, keep)
            if info.ffn_gate_unit is not None:
                _select_rows(model, info.ffn_gate_unit, keep)
            _select_cols(model, info.ffn_out_unit, keep)
            if structure.refit and stats is not None:
                _refit(model, info.ffn_out_unit, out, keep, stats, cache)
    return in_index


def _refit(model: nn.Module, path: str, full: nn.Module, idx: Tensor, stats: StructureStats,
           cache: DecompositionCache) -> None:
    """Overwrite the column-selected projection at `path` with the least-squares re-fit of `full`."""
    w, b = cache.refit(path, full.weight.detach(), None if full.bias is None else full.bias.detach(), idx, stats)
    new = get_module(model, path)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)


def _realias(model: nn.Module, adapter: ModelAdapter, plan: CompressionPlan, unit: Unit,
             shared_away: set[int]) -> None:
    """After replacing a shared unit's module, point its twins in the group at the new module."""
    if unit.layer is None or not plan.sharing.groups:
        return
    for g in plan.sharing.groups:
        if unit.layer != g[0]:
            continue
        rep = adapter.layers[g[0]]
        if not unit_in_scope(unit, rep, plan.sharing.scope):
            return
        new = get_module(model, unit.name)
        for j in g[1:]:
            if j in shared_away:
                set_module(model, layer_path_swap(unit.name, rep, adapter.layers[j]), new)
