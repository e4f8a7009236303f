"""Start points for the first generation of a search under a hard memory budget.

Under a tight budget almost no unbiased random plan fits (on MiniLM at 15% of fp32, fewer than 1 in
4,000), so the first generation would be wasted. Three sources, in order:

1. uniform plans inside the space that fit (the in-space baselines);
2. sensitivity-guided plans (HAWQ/HAQ-style): starting from the cheapest plan, measure on a small
   slice of the search data how much quality each single parameter upgrade buys and what it costs in
   exact bytes, then fill budgets from 100% down to the cheapest plan greedily by quality per byte;
3. random plans drawn with a random thrift level, kept only if their exact memory fits.

With budget.latency every point is then repaired down to the latency budget as well (search/repair.py, with the
measured sensitivity as gains), and dropped if it cannot be; duplicates after repair are queued once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from slimformer.compression.memory import plan_memory
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.search.context import SearchContext
from slimformer.search.pause import pause_at
from slimformer.search.records import TrialRecord
from slimformer.search.repair import latency_order, repair_params


@dataclass(frozen=True)
class Upgrade:
    """One parameter moved off its cheapest choice: measured quality gain and exact byte cost."""

    param: str
    choice: Any
    quality_gain: float
    extra_bytes: int

    @property
    def gain_per_mb(self) -> float:
        return self.quality_gain / max(self.extra_bytes, 1) * 1e6


@dataclass(frozen=True)
class Sensitivity:
    base_params: dict[str, Any]
    base_quality: float
    base_bytes: int
    upgrades: list[Upgrade]
    seconds: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {"base_quality": self.base_quality, "base_bytes": self.base_bytes, "samples": self.samples,
                "seconds": round(self.seconds, 2), "base_params": self.base_params,
                "upgrades": [asdict(u) | {"gain_per_mb": u.gain_per_mb} for u in
                             sorted(self.upgrades, key=lambda u: -u.gain_per_mb)]}


def measure_sensitivity(ctx: SearchContext, batches: int = 1) -> Sensitivity | None:
    """Quality gain and byte cost of every single-parameter upgrade from the cheapest plan."""
    space = ctx.space
    order = space.choice_costs()
    base = {p: c[0] for p, c in order.items()}
    base_bytes = plan_memory(ctx.adapter, space.plan_from_params(base)).total_bytes
    if base_bytes > ctx.budget_bytes or not order:
        return None
    t0 = time.perf_counter()
    quick = FidelityEvaluator(ctx.adapter, ctx.sets.search[:batches], device=ctx.device)

    def quality(params: dict[str, Any]) -> float:
        model = ctx.compress(space.plan_from_params(params))
        return quick.evaluate(model).value(ctx.quality_metric)

    q0 = quality(base)
    pause_at("sensitivity")
    ups = []
    for p, choices in order.items():
        for c in choices[1:]:
            params = base | {p: c}
            extra = plan_memory(ctx.adapter, space.plan_from_params(params)).total_bytes - base_bytes
            if base_bytes + extra > ctx.budget_bytes:
                continue
            ups.append(Upgrade(p, c, quality(params) - q0, extra))
    n = sum(int(b.inputs[next(iter(b.inputs))].shape[0]) for b in ctx.sets.search[:batches])
    return Sensitivity(base, q0, base_bytes, ups, time.perf_counter() - t0, n)


def greedy_plans(ctx: SearchContext, sens: Sensitivity, n: int) -> list[dict[str, Any]]:
    """n plans filling budgets spread from the full budget down to the cheapest plan."""
    ranked = sorted((u for u in sens.upgrades if u.quality_gain > 0), key=lambda u: -u.gain_per_mb)
    out: list[dict[str, Any]] = []
    for i in range(n):
        frac = 1.0 - i / max(n, 1)
        target = sens.base_bytes + frac * (ctx.budget_bytes - sens.base_bytes)
        params = dict(sens.base_params)
        upgraded: set[str] = set()
        for u in ranked:
            if u.param in upgraded:
                continue
            trial = params | {u.param: u.choice}
            if plan_memory(ctx.adapter, ctx.space.plan_from_params(trial)).total_bytes <= target:
                params = trial
                upgraded.add(u.param)
        if params not in out:
            out.append(params)
    return out


def enqueue_start_points(ctx: SearchContext, study: optuna.Study, log: Any = None
                         ) -> tuple[int, Sensitivity | None]:
    """Queue at most min(population, trials) feasible start points; returns (count, sensitivity).

    Points whose parameters a trial of the study already holds (queued or run, e.g. by a driver killed while
    queueing, whose claim this driver took over) are not queued again."""
    say = log or (lambda msg: None)
    want = min(ctx.config.sampler.population_size, ctx.config.trials)
    points: list[tuple[dict[str, Any], str]] = []

    lat_order = latency_order(ctx)
    order = ctx.space.choice_costs() if lat_order is not None else {}
    sens: Sensitivity | None = None
    repaired: list[int | None] = []  # repair steps of each point (None: none taken)

    def add(params: dict[str, Any], source: str) -> None:
        full = ctx.space.default_params() | params
        steps = 0
        if lat_order is not None:  # a latency budget: repair the point down to both budgets
            gains = {(u.param, u.choice): u.quality_gain for u in sens.upgrades} if sens is not None else {}
            full, steps = repair_params(ctx, full, order, gains, lat_order)
            if ctx.violation(ctx.memory(plan := ctx.space.plan_from_params(full)), ctx.predicted_ms(plan)) > 0:
                return  # cannot be repaired into both budgets
            source = f"{source} (repaired)" if steps else source
        if len(points) < want and all(full != p for p, _ in points):
            points.append((full, source))
            repaired.append(steps or None)

    if ctx.config.start_points == "none":
        return 0, None
    for p in ctx.space.seed_params(ctx.budget_bytes):
        add(p, "uniform")
    if ctx.config.start_points == "sensitivity" and len(points) < want:
        say("measuring per-parameter sensitivity for start points")
        sens = measure_sensitivity(ctx)
        if sens is not None:
            for p in greedy_plans(ctx, sens, max(1, (want - len(points) + 1) // 2)):
                add(p, "sensitivity-greedy")
    for p in ctx.space.random_feasible_params(ctx.budget_bytes, want - len(points), seed=ctx.config.sampler.seed):
        add(p, "random-feasible")
    held = [t.params or t.system_attrs.get("fixed_params") or {} for t in study.get_trials(deepcopy=False)]
    queued = 0
    for (params, source), steps in zip(points, repaired):
        if any(params == h for h in held):
            continue
        study.enqueue_trial(params, user_attrs=TrialRecord(start_point=source, repaired_steps=steps).to_user_attrs())
        queued += 1
        pause_at("start-points")
    return queued, sens
