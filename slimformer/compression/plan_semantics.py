"""What a plan means for one model, without touching a tensor: validation against the model, the
canonical form (shared units and layers carry their representative's spec), sharing scopes and the
rank a unit really gets. Memory, recipes, latency and export price or describe plans with these;
only apply.py turns a plan into modules.
"""

from __future__ import annotations

from dataclasses import replace

from slimformer.compression.plan import LINEAR_ONLY_BITS, CompressionPlan, LayerSpec, StructureSpec, UnitSpec
from slimformer.errors import PlanError
from slimformer.models.base import LayerInfo, ModelAdapter, Unit


def layer_path_swap(name: str, src: LayerInfo, dst: LayerInfo) -> str:
    """The same module path in another layer (e.g. encoder.layer.0.x -> encoder.layer.3.x)."""
    return dst.path + name[len(src.path):]


def scope_paths(layer: LayerInfo, scope: str) -> tuple[str, ...]:
    """Module paths of one layer that a sharing scope ('attention', 'ffn' or 'block') covers."""
    if scope == "block":
        return (layer.path,)
    return layer.attention_scope if scope == "attention" else layer.ffn_scope


def unit_in_scope(unit: Unit, layer: LayerInfo, scope: str) -> bool:
    """Whether a unit lives under the layer's modules that the sharing scope covers."""
    return any(unit.name == p or unit.name.startswith(p + ".") for p in scope_paths(layer, scope))


def effective_rank(spec: UnitSpec, shape: tuple[int, int]) -> int | None:
    """The rank a (out, in) matrix is factorised to (None: not factorised); never above its full rank."""
    return None if spec.rank is None else min(spec.rank, shape[0], shape[1])


def canonical_plan(adapter: ModelAdapter, plan: CompressionPlan) -> CompressionPlan:
    """Validate a plan against the model and give shared units/layers their representative's spec; the
    structure setting is reset to its default when no layer drops heads or neurons (it means nothing then)."""
    names = set(adapter.unit_names)
    unknown = sorted(set(plan.units) - names)
    if unknown:
        raise PlanError(f"plan names unit(s) the model lacks: {unknown[:3]}; run `slimformer inspect` "
                        "to list the model's units")
    kinds = {u.name: u.kind for u in adapter.units}
    not_linear = sorted(n for n, s in plan.units.items() if s.kernel != "exact" and kinds[n] != "linear")
    if not_linear:
        raise PlanError(f"kernel 'int8' applies to linear units, not to {not_linear[0]} (a {kinds[not_linear[0]]}); "
                        "use kernel exact for it")
    tiered = sorted(n for n, s in plan.units.items() if s.tiers is not None and kinds[n] != "embedding")
    if tiered:
        raise PlanError(f"embedding tiers apply to embedding tables, not to {tiered[0]} (a {kinds[tiered[0]]})")
    low = sorted(n for n, s in plan.units.items() if s.bits in LINEAR_ONLY_BITS and kinds[n] != "linear")
    if low:
        raise PlanError(f"bits {plan.units[low[0]].bits} apply to linear units, not to {low[0]} (a {kinds[low[0]]}); "
                        "use bits 4 or 8 for it")
    n_layers = len(adapter.layers)
    for g in plan.sharing.groups:
        bad = [i for i in g if not 0 <= i < n_layers]
        if bad:
            raise PlanError(f"sharing group {list(g)} names layer(s) {bad}; the model has layers 0..{n_layers-1}")
    for i, ls in plan.layers.items():
        if not 0 <= i < n_layers:
            raise PlanError(f"layer spec for layer {i}; the model has layers 0..{n_layers - 1}")
        info = adapter.layers[i]
        if ls.heads_kept is not None and ls.heads_kept > info.num_heads:
            raise PlanError(f"layer {i}: heads_kept {ls.heads_kept} > {info.num_heads} heads")
        if ls.heads_kept is not None and ls.heads_kept % info.kv_group:
            raise PlanError(f"layer {i}: heads_kept {ls.heads_kept} is not a multiple of {info.kv_group}, the query "
                            "heads per key/value group (grouped-query attention prunes whole groups)")
        if ls.neurons_kept is not None and ls.neurons_kept > info.intermediate:
            raise PlanError(f"layer {i}: neurons_kept {ls.neurons_kept} > {info.intermediate} neurons")
    units = dict(plan.units)
    layers = dict(plan.layers)
    scope = plan.sharing.scope
    for g in plan.sharing.groups:
        rep = adapter.layers[g[0]]
        for j in g[1:]:
            other = adapter.layers[j]
            for u in adapter.units:
                if u.layer == rep.index and unit_in_scope(u, rep, scope):
                    twin = layer_path_swap(u.name, rep, other)
                    if u.name in units:
                        units[twin] = units[u.name]
                    else:
                        units.pop(twin, None)
            rl, ol = plan.layer(rep.index), plan.layer(j)
            heads = rl.heads_kept if scope in ("attention", "block") else ol.heads_kept
            neurons = rl.neurons_kept if scope in ("ffn", "block") else ol.neurons_kept
            layers[j] = LayerSpec(heads, neurons)
    units = {k: v for k, v in units.items() if not v.is_identity}
    layers = {k: v for k, v in layers.items() if v != LayerSpec()}
    structure = plan.structure if layers else StructureSpec()
    return replace(plan, units=units, layers=layers, structure=structure)
