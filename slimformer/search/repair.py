"""Budget repair: make every sampled plan fit the memory budget before it is suggested to the trial.

Under a tight budget most offspring of a sampler do not fit: NSGA-II's crossover of two plans at the budget
boundary (and its random mutations) overshoots it, and in the Quickstart search (MiniLM, 15%) about 70-90% of
its samples after the start points were over budget, never evaluated. `BudgetRepairSampler` wraps any Optuna
sampler: it lets the sampler propose a value for every parameter (its relative proposal, the rest from its
independent sampling), then, while the plan is over budget, moves one parameter one step down its cost order
(search space's `choice_costs`), choosing the step that loses the least measured quality per byte saved (the
sensitivity table the start points measured, study user attr `slimformer_sensitivity`; without it, the step
saving the most bytes). The repaired values are the trial's parameters, so the study, the recipe and the
evaluated plan agree, and the sampler learns from what was evaluated (Lamarckian repair). Queued trials (start
points, retries) keep their fixed parameters.
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


def repair_params(ctx: SearchContext, params: dict[str, Any], order: dict[str, list[Any]],
                  gains: dict[tuple[str, Any], float]) -> tuple[dict[str, Any], int]:
    """(params moved step by step down the cost order until the plan fits the budget, number of steps).
    Each step takes the smallest quality loss per byte saved (`gains`: measured gain of each choice over the
    cheapest); a plan that cannot be made to fit comes back at its cheapest reachable point."""
    out = dict(params)

    def size(p: dict[str, Any]) -> int:
        return plan_memory(ctx.adapter, ctx.space.plan_from_params(p)).total_bytes

    now = size(out)
    steps = 0
    while now > ctx.budget_bytes:
        best: tuple[float, int, str, Any, int] | None = None
        for name, choices in order.items():
            i = choices.index(out[name]) if out.get(name) in choices else 0
            if i == 0:
                continue
            cheaper = choices[i - 1]
            new = size(out | {name: cheaper})
            saved = now - new
            if saved <= 0:
                continue
            loss = max(0.0, gains.get((name, out[name]), 0.0) - gains.get((name, cheaper), 0.0))
            key = (loss / saved, -saved, name, cheaper, new)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            break
        _, _, name, cheaper, now = best
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
    """Wraps a sampler so that every plan it proposes is repaired to fit the memory budget (see module doc)."""

    def __init__(self, base: optuna.samplers.BaseSampler, ctx: SearchContext) -> None:
        self.base = base
        self._ctx = ctx
        self._dists = ctx.space.distributions()
        self._order: dict[str, list[Any]] | None = None
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
        if self._gains is None:
            self._gains = sensitivity_gains(study)
        repaired, steps = repair_params(self._ctx, params, self._order, self._gains or {})
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
