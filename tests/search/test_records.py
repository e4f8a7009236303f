"""The typed study records (search/records.py) and report objects (search/results.py): one schema, read and
written in one place, with the same attr names and JSON keys as before."""

from __future__ import annotations

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from slimformer.search.records import (
    INTERRUPTED,
    TrialRecord,
    counted,
    counted_trials,
    infeasible_trials,
    is_feasible,
    retry_attrs,
    was_interrupted,
)
from slimformer.search.results import BestBaseline, BestRecipe, RecipeProvenance, SearchSummary


def _trial(state: TrialState, attrs: dict, values: list[float] | None = None):
    return create_trial(state=state, values=values, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                        user_attrs=attrs)


def test_record_round_trips_and_writes_only_what_is_known() -> None:
    rec = TrialRecord(memory_bytes=10, memory_percent=1.5, latency_ms=2.0, feasible=True, metrics={"cosine": 0.9})
    attrs = rec.to_user_attrs()
    assert attrs == {"memory_bytes": 10, "memory_percent": 1.5, "latency_ms": 2.0, "feasible": True,
                     "metrics": {"cosine": 0.9}}
    assert TrialRecord.from_user_attrs(attrs | {"someone_elses": 1}) == rec, "unknown attrs are ignored"
    assert TrialRecord().to_user_attrs() == {}
    assert retry_attrs({"start_point": "uniform", "memory_bytes": 3, "fail_reason": "x"}) == {"start_point": "uniform"}
    assert retry_attrs({"memory_bytes": 3}) == {}


def test_trial_predicates() -> None:
    ok = _trial(TrialState.COMPLETE, {"feasible": True, "trial_s": 1.0}, [0.9, 1.0, 5.0])
    over = _trial(TrialState.COMPLETE, {"feasible": False}, [-1.0, 1.0, 9.0])
    dead = _trial(TrialState.FAIL, {"fail_reason": INTERRUPTED})
    failed = _trial(TrialState.FAIL, {"fail_reason": "ValueError: x"})
    assert is_feasible(ok) and not is_feasible(over) and not is_feasible(dead)
    assert was_interrupted(dead) and not was_interrupted(failed)
    assert [counted(t) for t in (ok, over, dead, failed)] == [True, False, False, True]
    assert counted_trials([ok, over, dead, failed]) == 2 and infeasible_trials([ok, over, dead, failed]) == 1
    assert TrialRecord.from_trial(ok).evaluated and not TrialRecord.from_trial(over).evaluated


def test_summary_json_keys_follow_the_quality_metric() -> None:
    s = SearchSummary(model="m", quality_metric="cosine", budget_bytes=1, budget_percent=10.0, fp32_bytes=10,
                      trial_states={"COMPLETE": 2}, infeasible_trials=0, evaluated_trials=2, pruned_trials=0,
                      mean_pruned_trial_s=None, elapsed_s=1.0, mean_trial_s=0.5, mean_eval_s=0.4,
                      mean_outside_forward_s=0.1,
                      best_recipe=BestRecipe(1, "recipes/trial-1.yaml", 9.0, 0.9, {"cosine": 0.9}),
                      best_baseline=BestBaseline("uniform-int8", 25.0, 0.8, {"cosine": 0.8}),
                      latency_label="roofline", latency_source="estimate", hardware_profile="hw",
                      hardware_profile_version="1")
    d = s.to_json()
    assert list(d)[:3] == ["model", "quality_metric", "budget_bytes"] and list(d)[-1] == "recovery"
    assert d["best_recipe"]["heldout_cosine"] == 0.9 and d["best_baseline"]["heldout_cosine"] == 0.8
    assert SearchSummary.from_json(d) == s


def test_provenance_has_the_search_recipes_keys() -> None:
    t = _trial(TrialState.COMPLETE, {"feasible": True, "memory_bytes": 10, "memory_percent": 1.5, "latency_ms": 2.0,
                                     "metrics": {"cosine": 0.9}}, [0.9, 2.0, 10.0])
    with_heldout = RecipeProvenance.of_trial("s", "sqlite:///x", t, heldout={"cosine": 0.8}).to_json()
    assert list(with_heldout) == ["study", "storage", "trial", "metrics", "versions", "created"]
    assert with_heldout["metrics"] == {"memory_bytes": 10, "memory_percent": 1.5, "latency_ms_estimate": 2.0,
                                       "search_cosine": 0.9, "heldout_cosine": 0.8}
    exported = RecipeProvenance.of_trial("s", "sqlite:///x", t).to_json()
    assert "heldout_cosine" not in exported["metrics"] and set(exported["versions"]) >= {"slimformer", "torch"}


def test_latency_infeasible_trials_are_off_the_front_and_recorded_as_such() -> None:
    import optuna

    from slimformer.search.results import LatencyBudget, ParetoFront, pareto_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": FloatDistribution(0, 1)}

    def add(x: float, values: list[float], attrs: dict, constraints: dict[str, float]) -> None:
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=values, params={"x": x}, distributions=dist,
                                     user_attrs=attrs,
                                     system_attrs={f"constraints:{k}": v for k, v in constraints.items()}))

    add(0.1, [0.9, 2.0], {"feasible": True}, {"memory": -5.0, "latency": -0.5})
    add(0.2, [-1.0, 9.0], TrialRecord(feasible=False, over_budget="latency").to_user_attrs(),
        {"memory": -5.0, "latency": 6.5})
    add(0.3, [0.99, 1.0], {"feasible": True}, {"memory": -5.0, "latency": 0.5})  # a violated constraint wins
    trials = study.get_trials()
    assert [is_feasible(t) for t in trials] == [True, False, False]
    assert [t.number for t in pareto_trials(study, ["quality", "latency"])] == [0]
    assert TrialRecord.from_trial(trials[1]).over_budget == "latency" and infeasible_trials(trials) == 1
    lb = LatencyBudget(2.5, "0.5x", 5.0, 1, 128, "calibrated")
    front = ParetoFront(["quality", "latency"], "cosine", 10, 100, [], lb)
    assert list(front.to_json()) == ["objectives", "quality_metric", "budget_bytes", "fp32_bytes", "latency_budget",
                                     "trials"]
    assert ParetoFront.from_json(front.to_json()) == front
    assert "latency_budget" not in ParetoFront(["quality"], "cosine", 10, 100, []).to_json()
