"""Ray Tune integration: slimformer's search space and one-plan evaluation as a Tune trainable.

`--backend ray` (search/ray_backend.py) runs slimformer's own trial loop in Ray workers on one shared Optuna
study, which keeps resume, budget repair, start points and the run directory. Users who drive their own
`ray.tune.Tuner` (their schedulers, `OptunaSearch`, `ResultGrid`, tracking callbacks) use this module instead:

    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    from slimformer.search.tune import TuneObjective, tune_space

    objective = TuneObjective("search.yaml")             # validated and prepared once, in the driver
    tuner = tune.Tuner(objective.trainable(), param_space=tune_space(objective),
                       tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric=objective.metrics,
                                                   mode=objective.modes), num_samples=40))
    best = tuner.fit()...                                  # then objective.recipe(params).save("r.yaml")

Each Tune trial compresses and scores one plan exactly as a slimformer trial does (evaluate.evaluate_plan) and
reports `quality` (the config's quality metric on the search set), `latency_ms`, `memory_bytes` and `feasible`.
A plan over a budget is not evaluated: it reports `feasible: False` and the worst quality, so a searcher
ranks it last (Tune has no constraint API for OptunaSearch). Nothing is written to a run directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.recipe import Recipe
from slimformer.errors import ConfigError
from slimformer.search.config import SearchConfig
from slimformer.search.context import SearchContext, prepare
from slimformer.search.evaluate import evaluate_plan, price_latency
from slimformer.search.results import DIRECTIONS

WORST_QUALITY = -1.0
TuneValue = float | int | bool | str


class TuneObjective:
    """A search config prepared once (model, data, teacher outputs, budgets validated) for Ray Tune trials."""

    def __init__(self, config: str | Path | SearchConfig, *, log: Callable[[str], None] | None = None) -> None:
        cfg = config if isinstance(config, SearchConfig) else SearchConfig.load(str(config))
        self.ctx: SearchContext = prepare(cfg, log=log)

    @property
    def metrics(self) -> list[str]:
        """The reported metric names of the config's objectives, in order (for OptunaSearch's `metric`)."""
        return [{"quality": "quality", "latency": "latency_ms", "memory": "memory_bytes"}[o]
                for o in self.ctx.config.objectives]

    @property
    def modes(self) -> list[str]:
        """'max' / 'min' per metric (for OptunaSearch's `mode`)."""
        return ["max" if DIRECTIONS[o] == "maximize" else "min" for o in self.ctx.config.objectives]

    def choices(self) -> dict[str, list[Any]]:
        """Every search parameter and its choices: the same names and values as slimformer's Optuna trials."""
        return {name: list(d.choices) for name, d in self.ctx.space.distributions().items()}

    def plan(self, params: Mapping[str, Any]) -> CompressionPlan:
        """The plan of one Tune trial's parameters (unknown or missing names are a ConfigError)."""
        known = self.ctx.space.distributions()
        extra = sorted(set(params) - set(known))
        missing = sorted(set(known) - set(params))
        if extra or missing:
            raise ConfigError(f"Tune parameters do not match the search space: unknown {extra}, missing {missing}; "
                              "use tune_space(objective) as the Tuner's param_space")
        return self.ctx.space.plan_from_params(params)

    def evaluate(self, params: Mapping[str, Any]) -> dict[str, TuneValue]:
        """Score one plan: quality on the search set, priced latency and exact memory (not evaluated if over a
        budget: worst quality and feasible False)."""
        plan = self.plan(params)
        mem = plan_memory(self.ctx.adapter, plan).total_bytes
        lat = price_latency(self.ctx, plan).ms
        over = self.ctx.over_budget(mem, lat)
        if over:
            return {"quality": WORST_QUALITY, "latency_ms": lat, "memory_bytes": mem, "feasible": False,
                    "over_budget": "+".join(over)}
        ev = evaluate_plan(self.ctx, plan)
        return {"quality": ev.quality, "latency_ms": ev.latency_ms, "memory_bytes": ev.memory_bytes,
                "feasible": True, "over_budget": "", **{f"search_{k}": v for k, v in ev.metrics.items()}}

    def trainable(self) -> Callable[[dict[str, Any]], dict[str, TuneValue]]:
        """A Tune function trainable; the prepared context travels once through the object store
        (`tune.with_parameters`), not with every trial."""
        from ray import tune

        return tune.with_parameters(_tune_trial, objective=self)

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        """The recipe of a Tune result's parameters (apply it with `slimformer apply`)."""
        ctx = self.ctx
        return Recipe.from_plan(self.plan(params), ctx.adapter, hardware_profile=ctx.profile.name,
                                hardware_profile_version=ctx.profile.version)


def _tune_trial(config: dict[str, Any], objective: TuneObjective) -> dict[str, TuneValue]:
    """The function Ray Tune runs for one trial: its final result is the returned metrics."""
    return objective.evaluate(config)


def tune_space(objective: TuneObjective) -> dict[str, Any]:
    """The search space as a Tune `param_space` (`tune.choice` per parameter)."""
    from ray import tune

    return {name: tune.choice(values) for name, values in objective.choices().items()}
