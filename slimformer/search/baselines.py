"""Uniform baselines every search is compared with: one setting on every unit of the model.

uniform-int8 (per channel) and uniform-int4 (each group size the space offers; round to nearest, and
GPTQ when calibration Hessians exist, embeddings round to nearest in both); uniform-rank and
uniform-sparsity at the mildest level that fits the budget (found by bisection on exact memory).
Baselines that do not fit the budget are listed with their memory and not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.models.base import ModelAdapter, Unit
from slimformer.spaces.space import rank_from_fraction


@dataclass(frozen=True)
class Baseline:
    name: str
    plan: CompressionPlan
    memory_bytes: int
    fits: bool


def _uniform(adapter: ModelAdapter, make: Callable[[Unit], UnitSpec]) -> CompressionPlan:
    return CompressionPlan(units={u.name: make(u) for u in adapter.units})


def _mildest(adapter: ModelAdapter, budget: int, make: Callable[[float], CompressionPlan],
             lo: float, hi: float, larger_is_milder: bool) -> tuple[float, CompressionPlan] | None:
    """Bisection for the mildest level in [lo, hi] whose plan fits the budget (None if none does)."""
    strict = lo if larger_is_milder else hi
    if plan_memory(adapter, make(strict)).total_bytes > budget:
        return None
    good = strict
    a, b = lo, hi
    for _ in range(14):
        mid = (a + b) / 2
        fits = plan_memory(adapter, make(mid)).total_bytes <= budget
        if fits:
            good = mid
        if fits == larger_is_milder:
            a = mid
        else:
            b = mid
    return good, make(good)


def uniform_baselines(adapter: ModelAdapter, budget: int, group_sizes: list[int | None], gptq: bool = False
                      ) -> list[Baseline]:
    out: list[Baseline] = []

    def add(name: str, plan: CompressionPlan) -> None:
        mem = plan_memory(adapter, plan).total_bytes
        out.append(Baseline(name, plan, mem, mem <= budget))

    add("uniform-int8", _uniform(adapter, lambda u: UnitSpec(bits=8)))
    for g in sorted({g for g in group_sizes if g is not None}) or [32]:
        add(f"uniform-int4-g{g}", _uniform(adapter, lambda u, g=g: UnitSpec(bits=4, group_size=g)))
    if gptq:
        for g in sorted({g for g in group_sizes if g is not None}) or [32]:
            add(f"uniform-int4-g{g}-gptq", _uniform(adapter, lambda u, g=g: UnitSpec(
                bits=4, group_size=g, method="gptq" if u.kind == "linear" else "rtn")))

    def rank_plan(frac: float) -> CompressionPlan:
        return _uniform(adapter, lambda u: UnitSpec(rank=rank_from_fraction(frac, u.shape)))

    found = _mildest(adapter, budget, rank_plan, 0.01, 1.0, larger_is_milder=True)
    if found is not None:
        add(f"uniform-rank-{found[0]:.3f}", found[1])
    else:
        add("uniform-rank", rank_plan(0.01))

    def sparse_plan(s: float) -> CompressionPlan:
        return _uniform(adapter, lambda u: UnitSpec(sparsity=round(s, 4)))

    found = _mildest(adapter, budget, sparse_plan, 0.0, 0.99, larger_is_milder=False)
    if found is not None:
        add(f"uniform-sparsity-{found[0]:.3f}", found[1])
    else:
        add("uniform-sparsity", sparse_plan(0.99))
    return out
