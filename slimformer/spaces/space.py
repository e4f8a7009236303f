"""SearchSpace: a SpaceConfig bound to a model's units, converted to Optuna categorical parameters.

Each parameter controls a *bundle* of units (one group, or one group x layer when per_layer). The
same parameters rebuild the plan from a stored trial (`plan_from_params`), so a Pareto trial's recipe
is always reproducible from the study.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution

from slimformer.compression.embedding_tiers import TierSpec, TokenRanking, parse_layout
from slimformer.compression.memory import deployed_unit_bytes, plan_memory
from slimformer.compression.plan import (
    INT_BITS,
    LINEAR_ONLY_BITS,
    CompressionPlan,
    LayerSpec,
    StructureSpec,
    UnitSpec,
    sharing_pattern,
)
from slimformer.errors import ConfigError
from slimformer.models.base import ModelAdapter, Unit
from slimformer.spaces.config import GroupConfig, SpaceConfig

UNIT_KEYS = ("rank_fraction", "sparsity", "bits", "group_size", "method", "kernel", "tiers")


@dataclass(frozen=True)
class Bundle:
    """Units decided together by one set of parameters (prefix + key)."""

    prefix: str
    group: GroupConfig
    units: tuple[Unit, ...]
    layers: tuple[int, ...]  # layers whose heads/neurons this bundle decides


def rank_from_fraction(frac: float, shape: tuple[int, int]) -> int | None:
    return None if frac >= 1.0 else max(1, round(frac * min(shape)))


def spec_from_choice(choice: Mapping[str, Any], shape: tuple[int, int], kind: str = "linear",
                     ranking: TokenRanking | None = None, smooth: float | None = None) -> UnitSpec:
    """The unit spec of one bundle choice; `kernel` counts only for 8/4-bit linears (else exact), `tiers` only for
    embedding tables (a layout other than none replaces bits/rank/sparsity; rows ranked by `ranking`, by token id
    when None: the bytes are the same, only which rows land in which tier differs); `smooth` (the group's
    SmoothQuant alpha) only for units whose kernel is int8."""
    layout = choice.get("tiers", "none")
    if layout != "none" and kind == "embedding":
        return UnitSpec(tiers=TierSpec(parse_layout(layout), ranking or TokenRanking(shape[0], ())))
    sparsity = choice.get("sparsity", 0.0)
    pattern = "2:4" if sparsity == "2:4" else "unstructured"
    bits = int(choice.get("bits", 32))
    kernel = choice.get("kernel", "exact") if bits in (8, 4) and kind == "linear" else "exact"
    return UnitSpec(
        rank=rank_from_fraction(float(choice.get("rank_fraction", 1.0)), shape),
        sparsity=0.5 if pattern == "2:4" else float(sparsity),
        pattern=pattern,  # type: ignore[arg-type]
        bits=bits,
        group_size=choice.get("group_size") if bits in INT_BITS else None,
        method=choice.get("method", "rtn") if bits in INT_BITS else "rtn",
        kernel=kernel,
        smooth=smooth if kernel == "int8" else None,
    )


class SearchSpace:
    """Bound search space. `suggest(trial)` samples a plan; `plan_from_params` replays one."""

    def __init__(self, adapter: ModelAdapter, config: SpaceConfig) -> None:
        self.adapter = adapter
        self.config = config
        self.token_ranking: TokenRanking | None = None  # set by use_token_ranking (the search's text)
        self.bundles = self._bundles()
        n = len(adapter.layers)
        self.sharing_choices = [f"{p}/{s}" if p != "none" else "none"
                                for p in config.sharing for s in config.sharing_scope]
        self.sharing_choices = list(dict.fromkeys(self.sharing_choices))
        for choice in self.sharing_choices:
            self._sharing(choice, n)  # validate against the layer count now
        for b in self.bundles:  # structure choices must fit every layer they apply to
            for key in ("heads_kept", "neurons_kept"):
                for value in getattr(b.group, key) or []:
                    for layer in b.layers:
                        self._structure_value(key, value, layer)
        self._check_structure_owners()
        self._check_2_4()
        self._check_low_bits()

    def _check_low_bits(self) -> None:
        """Bits 3 and 2 run exactly for linear units only: a group that offers them for an embedding table is a
        config error here rather than a failed trial for each plan that picks them."""
        for b in self.bundles:
            low = sorted(set(b.group.bits) & set(LINEAR_ONLY_BITS))
            table = next((u for u in b.units if u.kind != "linear"), None)
            if low and table is not None:
                raise ConfigError(
                    f"space.groups[{b.prefix.split('.')[0][1:]}].bits {low[-1]} applies to linear units, but the "
                    f"group selects {table.name} (a {table.kind}); select linear roles only or drop bits {low}")

    @property
    def has_tiers(self) -> bool:
        """Whether some embedding table of the space can take frequency tiers (then it needs a token ranking)."""
        return any(u.kind == "embedding" and any(t != "none" for t in b.group.tiers)
                   for b in self.bundles for u in b.units)

    def use_token_ranking(self, ranking: TokenRanking) -> None:
        """Rank the table's rows for tiered choices by `ranking` (token frequency on the reference text)."""
        self.token_ranking = ranking

    def _check_structure_owners(self) -> None:
        """One group decides a layer's heads_kept (neurons_kept): with two, one would silently override the other."""
        owner: dict[tuple[str, int], str] = {}
        for b in self.bundles:
            group = b.prefix.split(".")[0]
            for key in ("heads_kept", "neurons_kept"):
                if not getattr(b.group, key):
                    continue
                for layer in b.layers:
                    first = owner.setdefault((key, layer), group)
                    if first != group:
                        raise ConfigError(
                            f"space.groups[{first[1:]}] and space.groups[{group[1:]}] both choose {key} for layer "
                            f"{layer}; set {key} in one group only (select: layers narrows a group)")

    def _check_2_4(self) -> None:
        """'2:4' sparsity needs every stored matrix's input dimension divisible by 4, the low-rank factors' rank
        included: found here instead of as a failed trial for each plan that picks it."""
        for b in self.bundles:
            if "2:4" not in b.group.sparsity:
                continue
            for u in b.units:
                ranks = {rank_from_fraction(f, u.shape) for f in b.group.rank_fraction} - {None}
                bad = sorted(d for d in {u.shape[1], *ranks} if d % 4)  # type: ignore[operator]
                if bad:
                    raise ConfigError(
                        f"space.groups[{b.prefix.split('.')[0][1:]}].sparsity '2:4' needs input dimensions "
                        f"divisible by 4, but unit {u.name} (shape {tuple(u.shape)}) would store {bad}; drop '2:4' "
                        "from this group or pick rank_fraction values whose ranks are multiples of 4")

    def _bundles(self) -> list[Bundle]:
        claimed: set[str] = set()
        bundles: list[Bundle] = []
        for gi, g in enumerate(self.config.groups):
            sel = g.select
            layer_set = sel.layer_set()
            units = []
            for u in self.adapter.units:
                if u.name in claimed:
                    continue
                if sel.role is not None and u.role not in sel.role:
                    continue
                if layer_set is not None and u.layer not in layer_set:
                    continue
                if sel.regex is not None:
                    import re

                    if re.search(sel.regex, u.name) is None:
                        continue
                units.append(u)
            if not units:
                raise ConfigError(f"space.groups[{gi}].select matches no unit of {self.adapter.model_id}; "
                                  "check role/layers/regex (`slimformer inspect MODEL` lists units)")
            claimed |= {u.name for u in units}
            per_layer = self.config.per_layer if g.per_layer is None else g.per_layer
            if per_layer:
                keys = sorted({u.layer for u in units}, key=lambda x: -1 if x is None else x)
                for layer in keys:
                    members = tuple(u for u in units if u.layer == layer)
                    tag = "emb" if layer is None else f"L{layer}"
                    bundles.append(Bundle(f"g{gi}.{tag}", g, members, () if layer is None else (layer,)))
            else:
                layers = tuple(sorted({u.layer for u in units if u.layer is not None}))
                bundles.append(Bundle(f"g{gi}", g, tuple(units), layers))
        return bundles

    def _sharing(self, choice: str, n_layers: int):  # -> SharingSpec
        if choice == "none":
            return sharing_pattern("none", n_layers)
        pattern, _, scope = choice.partition("/")
        try:
            return sharing_pattern(pattern, n_layers, scope)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"space.sharing: {exc}") from None

    # -- Optuna ------------------------------------------------------------------------------------
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Every parameter of the space with its choices (Optuna categorical distributions)."""
        out: dict[str, CategoricalDistribution] = {}
        for b in self.bundles:
            for key in UNIT_KEYS:
                choices = getattr(b.group, key)
                if len(choices) > 1:
                    out[f"{b.prefix}.{key}"] = CategoricalDistribution(choices)
            for key in ("heads_kept", "neurons_kept"):
                choices = getattr(b.group, key)
                if choices and len(choices) > 1 and b.layers:
                    out[f"{b.prefix}.{key}"] = CategoricalDistribution(choices)
        if len(self.sharing_choices) > 1:
            out["sharing"] = CategoricalDistribution(self.sharing_choices)
        return out

    def suggest(self, trial: optuna.Trial) -> CompressionPlan:
        params = {name: trial.suggest_categorical(name, list(d.choices))
                  for name, d in self.distributions().items()}
        return self.plan_from_params(params)

    def plan_from_params(self, params: Mapping[str, Any]) -> CompressionPlan:
        """Decode parameter values (from a trial, FixedTrial or stored params) into a plan."""
        units: dict[str, UnitSpec] = {}
        layers: dict[int, dict[str, int]] = {}
        for b in self.bundles:
            choice = {}
            for key in UNIT_KEYS:
                choices = getattr(b.group, key)
                choice[key] = params.get(f"{b.prefix}.{key}", choices[0])
            for u in b.units:
                spec = spec_from_choice(choice, u.shape, u.kind, self.token_ranking, b.group.smooth)
                if not spec.is_identity:
                    units[u.name] = spec
            for key in ("heads_kept", "neurons_kept"):
                choices = getattr(b.group, key)
                if not choices:
                    continue
                value = params.get(f"{b.prefix}.{key}", choices[0])
                for layer in b.layers:
                    layers.setdefault(layer, {})[key] = self._structure_value(key, value, layer)
        sharing = self._sharing(params.get("sharing", self.sharing_choices[0]), len(self.adapter.layers))
        layer_specs = {i: LayerSpec(v.get("heads_kept"), v.get("neurons_kept")) for i, v in layers.items()}
        structure = StructureSpec(self.config.structure.importance, self.config.structure.refit)
        return CompressionPlan(units, layer_specs, sharing, structure)

    def _structure_value(self, key: str, value: float, layer: int) -> int | None:
        info = self.adapter.layers[layer]
        if key == "heads_kept":
            v = int(value)
            if not 1 <= v <= info.num_heads:
                raise ConfigError(f"heads_kept {v} is outside 1..{info.num_heads} for layer {layer}")
            return None if v == info.num_heads else v
        v = round(value * info.intermediate) if value <= 1.0 else int(value)
        if not 1 <= v <= info.intermediate:
            raise ConfigError(f"neurons_kept {value} is outside (0, {info.intermediate}] for layer {layer}")
        return None if v == info.intermediate else v

    # -- budget ------------------------------------------------------------------------------------
    def min_memory_plan(self) -> CompressionPlan:
        """The smallest plan in the space (each bundle's cheapest combination, fewest heads/neurons)."""
        best_params: dict[str, Any] = {}
        for b in self.bundles:
            keys = [k for k in UNIT_KEYS if len(getattr(b.group, k)) > 1]
            best, best_bytes = None, None
            for combo in itertools.product(*(getattr(b.group, k) for k in keys)):
                choice = {k: getattr(b.group, k)[0] for k in UNIT_KEYS} | dict(zip(keys, combo))
                total = sum(deployed_unit_bytes(self.adapter, u, u.shape, spec_from_choice(choice, u.shape, u.kind,
                                                                                     smooth=b.group.smooth))
                            for u in b.units)
                if best_bytes is None or total < best_bytes:
                    best, best_bytes = combo, total
            best_params |= {f"{b.prefix}.{k}": v for k, v in zip(keys, best or ())}
            for key in ("heads_kept", "neurons_kept"):
                choices = getattr(b.group, key)
                if choices and len(choices) > 1 and b.layers:
                    layer = b.layers[0]
                    best_params[f"{b.prefix}.{key}"] = min(
                        choices, key=lambda c, k=key, i=layer: self._structure_value(k, c, i) or 10**9)
        plans = []
        for s in self.sharing_choices:
            plans.append(self.plan_from_params(best_params | {"sharing": s}))
        return min(plans, key=lambda p: plan_memory(self.adapter, p).total_bytes)

    def default_params(self) -> dict[str, Any]:
        """A value for every parameter that compresses least on the structural axes (all heads/neurons,
        full rank, no sparsity where offered) and takes the first listed choice elsewhere."""
        out: dict[str, Any] = {}
        for name, d in self.distributions().items():
            key = name.rsplit(".", 1)[-1]
            choices = list(d.choices)
            if key in ("heads_kept", "neurons_kept", "rank_fraction"):
                layer = next((b.layers[0] for b in self.bundles if name.startswith(b.prefix + ".") and b.layers),
                             None)
                if key == "rank_fraction" or layer is None:
                    out[name] = max(choices)
                else:
                    out[name] = max(choices, key=lambda c: self._structure_value(key, c, layer) or 10**9)
            elif key == "sparsity" and 0.0 in choices:
                out[name] = 0.0
            else:
                out[name] = choices[0]
        return out

    def uniform_params(self, **values: Any) -> dict[str, Any]:
        """Parameters that set every dimension named in `values` to that value where it is a choice."""
        params: dict[str, Any] = {}
        for name, dist in self.distributions().items():
            key = name.rsplit(".", 1)[-1]
            if key in values and values[key] in dist.choices:
                params[name] = values[key]
        return params

    def seed_params(self, budget_bytes: int) -> list[dict[str, Any]]:
        """Feasible starting points: uniform 4-bit at each group size the space offers, then 8-bit, each with the
        best rounding the space offers first (recon, gptq-ao, gptq, rtn: docs/BENCHMARKS.md, rounding)."""
        sizes = sorted({g for grp in self.config.groups for g in grp.group_size}, key=lambda g: (g is None, g))
        base = {"rank_fraction": 1.0, "sparsity": 0.0}
        offered = {m for grp in self.config.groups for m in grp.method}
        methods = [m for m in ("recon", "gptq-ao") if m in offered] + ["gptq", "rtn"]
        candidates = [self.uniform_params(bits=b, group_size=g, method=m, **base)
                      for b in (4, 8) for g in sizes for m in methods]
        seeds: list[dict[str, Any]] = []
        for p in candidates:
            full = self.default_params() | p
            if full not in seeds and plan_memory(self.adapter, self.plan_from_params(full)).total_bytes <= budget_bytes:
                seeds.append(full)
        return seeds

    def choice_costs(self) -> dict[str, list[Any]]:
        """Each parameter's choices ordered from cheapest to dearest in bytes (others held fixed)."""
        dists = self.distributions()
        base = {n: d.choices[0] for n, d in dists.items()}
        order: dict[str, list[Any]] = {}
        for name, d in dists.items():
            cost = [plan_memory(self.adapter, self.plan_from_params(base | {name: c})).total_bytes
                    for c in d.choices]
            order[name] = [c for _, _, c in sorted(zip(cost, range(len(cost)), d.choices))]
        return order

    def random_feasible_params(self, budget_bytes: int, n: int, seed: int | None = 0, max_tries: int = 2000
                               ) -> list[dict[str, Any]]:
        """Up to n random parameter sets whose plans fit the budget.

        Each draw picks a random thrift level and prefers cheaper choices accordingly, then keeps the
        draw only if its exact memory fits (rejection sampling), so tight budgets still get diverse,
        feasible start points spread from frugal to generous.
        """
        import math
        import random

        rng = random.Random(seed)
        order = self.choice_costs()
        found: list[dict[str, Any]] = []
        for _ in range(max_tries):
            if len(found) >= n:
                break
            tau = rng.uniform(0.0, 4.0)
            params = {}
            for name, choices in order.items():
                weights = [math.exp(-tau * i) for i in range(len(choices))]
                params[name] = rng.choices(choices, weights=weights)[0]
            if params not in found and \
                    plan_memory(self.adapter, self.plan_from_params(params)).total_bytes <= budget_bytes:
                found.append(params)
        return found

    def size(self) -> int:
        n = 1
        for d in self.distributions().values():
            n *= len(d.choices)
        return n
