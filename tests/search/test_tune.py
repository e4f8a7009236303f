"""Ray Tune users: a Tuner with OptunaSearch (multi-objective) over slimformer's trainable, on a local Ray bound
to 127.0.0.1; its best result becomes a recipe that applies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import tiny_config, write_config

from slimformer.errors import ConfigError

needs_tune = pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("pandas") is None,
                                reason="Ray Tune is not installed: pip install 'ray[tune]'")


@pytest.fixture(scope="module")
def objective(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from slimformer.search.tune import TuneObjective

    base = tmp_path_factory.mktemp("tune")
    cfg = write_config(base / "search.yaml", tiny_config(tiny_model_dir, base / "run-unused", budget={"memory": "25%"},
                                                         deploy="safetensors"))
    return TuneObjective(cfg)


def test_objective_scores_plans_like_a_search_trial(objective) -> None:
    choices = objective.choices()
    assert choices and all(len(v) >= 1 for v in choices.values())
    cheapest = {name: values[-1] for name, values in choices.items()}
    res = objective.evaluate(cheapest)
    assert set(res) >= {"quality", "latency_ms", "memory_bytes", "feasible"}
    assert res["memory_bytes"] == objective.ctx.memory(objective.plan(cheapest))
    if res["feasible"]:
        assert 0 < res["quality"] <= 1.0
    assert objective.metrics == ["quality", "latency_ms", "memory_bytes"]
    assert objective.modes == ["max", "min", "min"]


def test_a_plan_over_the_budget_is_not_evaluated(objective) -> None:
    choices = objective.choices()
    biggest = {name: values[0] for name, values in choices.items()}  # first choices: most bits, full rank
    mem = objective.ctx.memory(objective.plan(biggest))
    assert mem > objective.ctx.budget_bytes  # a 25% budget cannot hold 8 bits everywhere (about 32%)
    res = objective.evaluate(biggest)
    assert res["feasible"] is False and res["quality"] == -1.0 and res["over_budget"] == "memory"


def test_parameters_outside_the_space_are_refused(objective) -> None:
    with pytest.raises(ConfigError, match="do not match the search space"):
        objective.evaluate({"nope": 1})


@needs_tune
def test_tuner_with_optuna_search_runs_and_its_best_result_applies(objective, tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from slimformer.api import apply_recipe
    from slimformer.compression.plan_semantics import canonical_plan
    from slimformer.compression.recipe import Recipe
    from slimformer.search.ray_backend import LOOPBACK, loopback_node
    from slimformer.search.tune import tune_space

    with loopback_node():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
                 _node_ip_address=LOOPBACK)
    try:
        assert ray.util.get_node_ip_address() == LOOPBACK
        searcher = OptunaSearch(metric=objective.metrics, mode=objective.modes, seed=0)
        tuner = tune.Tuner(objective.trainable(), param_space=tune_space(objective),
                           tune_config=tune.TuneConfig(search_alg=searcher, num_samples=4, max_concurrent_trials=2),
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="slimformer",
                                                     verbose=0))
        grid = tuner.fit()
        assert len(grid) == 4 and not grid.errors
        feasible = [r for r in grid if r.metrics["feasible"]]
        assert feasible, "the tiny space has plans within its budget"
        best = max(feasible, key=lambda r: r.metrics["quality"])
        params = {k: best.config[k] for k in objective.choices()}
    finally:
        ray.shutdown()
    recipe_file = tmp_path / "best.yaml"
    objective.recipe(params).save(recipe_file)
    out = apply_recipe(recipe_file, str(tiny_model_dir), out_dir=tmp_path / "applied")
    assert out.memory.total_bytes == best.metrics["memory_bytes"]
    adapter = objective.ctx.adapter
    assert canonical_plan(adapter, Recipe.load(recipe_file).to_plan(adapter)) == canonical_plan(adapter,
                                                                                               objective.plan(params))
