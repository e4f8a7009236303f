"""Budget repair: make every sampled plan fit the memory budget (and budget.latency, when set) before it is
suggested to the trial.

Under a tight budget most offspring of a sampler do not fit: NSGA-II's crossover of two plans at the budget
boundary (and its random mutations) overshoots it, and in the Quickstart search (MiniLM, 15%) about 70-90% of
its samples after the start points were over budget, never evaluated. `BudgetRepairSampler` wraps any Optuna
sampler: it lets the sampler propose a value for every parameter (its relative proposal, the rest from its
independent sampling), then, while the plan is over budget, moves one parameter one step down its cost order
(search space's `choice_costs`), choosing the step that loses the least measured quality per byte saved (the
sensitivity table the start points measured, study user attr `slimformer_sensitivity`; without it, the step
saving the most bytes). The repaired values are the trial's parameters, so the study, the recipe and the
evaluated plan agree, and the sampler learns from what was evaluated (Lamarckian repair). Queued trials (start
points, retries) keep their fixed parameters (start.py repairs start points before queueing them).

With a latency budget a plan may be over either budget: a step may also move a parameter to its next faster
choice (latency is not monotone in bytes), and steps are ranked by quality loss per unit of violation reduced,
bytes and milliseconds over budget each normalised by their budget. Latency here is the search's latency source,
or for `source: measured` the profile's model (`SearchContext.latency_predictor`): a repaired plan may still
measure over the budget, and is then recorded as infeasible and not evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from slimformer.compression.memory import plan_memory
from slimformer.search.context import SearchContext
from slimformer.search.records import TrialRecord, study_sensitivity


def latency_order(ctx: SearchContext) -> dict[str, list[Any]] | None:
    """Each parameter's choices from fastest to slowest (predicted, the other parameters at their cheapest-bytes
    choice); None without a latency budget. Latency is not monotone in bytes (e.g. a grouped int8 kernel can be
    slower than per-channel), so repair steps down this order as well as the byte order."""
    if ctx.latency_budget_ms is None:
        return None
    dists = ctx.space.distributions()
    base = {n: c[0] for n, c in ctx.space.choice_costs().items()}
    order: dict[str, list[Any]] = {}
    for name, d in dists.items():
        ms = [ctx.predicted_ms(ctx.space.plan_from_params(base | {name: c})) for c in d.choices]
        order[name] = [c for _, _, c in sorted(zip(ms, range(len(ms)), d.choices))]
    return order


def _costs(ctx: SearchContext, params: dict[str, Any]) -> tuple[int, float | None]:
    """(exact bytes, predicted ms or None without a latency budget) of a parameter set."""
    plan = ctx.space.plan_from_params(params)
    ms = ctx.predicted_ms(plan) if ctx.latency_budget_ms is not None else None
    return plan_memory(ctx.adapter, plan).total_bytes, ms


def _reduction(ctx: SearchContext, now: tuple[int, float | None], new: tuple[int, float | None]) -> float:
    """What a step buys, in fractions of each budget: the savings on every budget the plan is over (counted in
    full, as bytes saved were before the latency budget), less any new overshoot it causes on either budget."""
    (mem0, ms0), (mem1, ms1) = now, new
    out = (mem0 - mem1) / ctx.budget_bytes if mem0 > ctx.budget_bytes else \
        -max(0, mem1 - ctx.budget_bytes) / ctx.budget_bytes
    lb = ctx.latency_budget_ms
    if lb is not None and ms0 is not None and ms1 is not None:
        out += (ms0 - ms1) / lb if ms0 > lb else -max(0.0, ms1 - lb) / lb
    return out


def repair_params(ctx: SearchContext, params: dict[str, Any], order: dict[str, list[Any]],
                  gains: dict[tuple[str, Any], float], lat_order: dict[str, list[Any]] | None = None
                  ) -> tuple[dict[str, Any], int]:
    """(params moved step by step down the cost order until the plan fits both budgets, number of steps).

    A step moves one parameter to its next cheaper choice in bytes (`order`) or, with a latency budget, in
    predicted latency (`lat_order`); each step takes the smallest quality loss per unit of violation reduced
    (`gains`: measured gain of each choice over the cheapest; violation: bytes and ms over budget, each as a
    fraction of its budget) and must lower the total violation, so the loop ends. A plan that cannot be made to
    fit comes back at the point where no step helps."""
    out = dict(params)
    now = _costs(ctx, out)
    violation = ctx.violation(*now)
    steps = 0
    while violation > 0:
        best: tuple[float, float, str, Any, tuple[int, float | None], float] | None = None
        for name, choices in order.items():
            cands = []
            for ordered in (choices, (lat_order or {}).get(name)):
                if ordered is None:
                    continue
                i = ordered.index(out[name]) if out.get(name) in ordered else 0
                if i > 0 and ordered[i - 1] not in cands:
                    cands.append(ordered[i - 1])
            for cheaper in cands:
                new = _costs(ctx, out | {name: cheaper})
                reduced = _reduction(ctx, now, new)
                new_violation = ctx.violation(*new)
                if reduced <= 0 or new_violation >= violation:
                    continue
                loss = max(0.0, gains.get((name, out[name]), 0.0) - gains.get((name, cheaper), 0.0))
                key = (loss / reduced, -reduced, name, cheaper, new, new_violation)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is None:
            break
        _, _, name, cheaper, now, violation = best
        out[name] = cheaper
        steps += 1
    return out, steps


def sensitivity_gains(study: optuna.Study) -> dict[tuple[str, Any], float] | None:
    """(param, choice) -> measured quality gain over the cheapest choice, from the study's sensitivity table."""
    sens = study_sensitivity(study)
    if not sens:
        return None
    return {(u["param"], u["choice"]): float(u["quality_gain"]) for u in sens.get("upgrades", [])}


class BudgetRepairSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that every plan it proposes is repaired to fit the memory and latency budgets (module doc)."""

    def __init__(self, base: optuna.samplers.BaseSampler, ctx: SearchContext) -> None:
        self.base = base
        self._ctx = ctx
        self._dists = ctx.space.distributions()
        self._order: dict[str, list[Any]] | None = None
        self._lat_order: dict[str, list[Any]] | None = None
        self._gains: dict[tuple[str, Any], float] | None = None

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        base_space = self.base.infer_relative_search_space(study, trial)
        params = dict(self.base.sample_relative(study, trial, base_space))  # also when empty: NSGA-II's generation
        for name, dist in self._dists.items():
            if name not in params:
                params[name] = self.base.sample_independent(study, trial, name, dist)
        if self._order is None:
            self._order = self._ctx.space.choice_costs()
            self._lat_order = latency_order(self._ctx)
        if self._gains is None:
            self._gains = sensitivity_gains(study)
        repaired, steps = repair_params(self._ctx, params, self._order, self._gains or {}, self._lat_order)
        if steps:
            TrialRecord(repaired_steps=steps).write_to(study._storage, trial._trial_id)
        return repaired

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
