"""The Optuna driver: sample a plan, price its memory, evaluate it if it fits, tell the study.

Infeasible plans (over the memory budget) are never evaluated: they are told to the study with a
positive `memory` constraint (Optuna's constrained domination steers away from them) and the worst
quality, and they are never Pareto points. Re-running the same command resumes: finished trials are
kept, trials left RUNNING by a killed driver are marked FAIL and replaced, the total reaches `trials`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan
from slimformer.errors import ConfigError
from slimformer.evaluators.latency import estimate_latency
from slimformer.search.context import SearchContext

DIRECTIONS = {"quality": "maximize", "latency": "minimize", "memory": "minimize"}
WORST_QUALITY = -1.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted (driver stopped)"
INFEASIBLE_CAP = 20  # stop after this many over-budget samples per requested trial


@dataclass(frozen=True)
class Evaluation:
    """One plan's scores: quality metrics on a data set, estimated latency, exact memory, timings."""

    metrics: dict[str, float]
    quality: float
    latency_ms: float
    memory_bytes: int
    apply_s: float
    eval_s: float


def evaluate_plan(ctx: SearchContext, plan: CompressionPlan, heldout: bool = False) -> Evaluation:
    """Compress a fresh copy with `plan` and score it (search set, or held-out set)."""
    mem = plan_memory(ctx.adapter, plan).total_bytes
    lat = latency_ms(ctx, plan)
    t0 = time.perf_counter()
    model = ctx.compress(plan)
    t1 = time.perf_counter()
    result = (ctx.heldout_eval if heldout else ctx.search_eval).evaluate(model)
    t2 = time.perf_counter()
    return Evaluation(result.metrics, result.value(ctx.quality_metric), lat, mem, t1 - t0, t2 - t1)


def latency_ms(ctx: SearchContext, plan: CompressionPlan) -> float:
    cfg = ctx.config.latency
    return estimate_latency(ctx.adapter.units, ctx.adapter.layers, plan, ctx.profile, batch=cfg.batch,
                            seq=cfg.seq).ms


def make_sampler(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    s = ctx.config.sampler
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=s.seed)
    if s.name == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=min(10, s.population_size))
    return optuna.samplers.RandomSampler(seed=s.seed)


def open_study(ctx: SearchContext, storage: str, study_name: str) -> optuna.Study:
    directions = [DIRECTIONS[o] for o in ctx.config.objectives]
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                    sampler=make_sampler(ctx), load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"storage {storage}: {str(exc).splitlines()[0]}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} in {storage} has other objectives; use a new --run-dir "
                          "or study_name")
    return study


def fail_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed driver as FAIL (single-driver storages only)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


def objective_values(ctx: SearchContext, quality: float, lat: float, mem: int) -> list[float]:
    vals = {"quality": quality, "latency": lat, "memory": float(mem)}
    return [vals[o] for o in ctx.config.objectives]


def make_objective(ctx: SearchContext) -> Callable[[optuna.Trial], list[float]]:
    def objective(trial: optuna.Trial) -> list[float]:
        t0 = time.perf_counter()
        plan = ctx.space.suggest(trial)
        mem = plan_memory(ctx.adapter, plan)
        lat = latency_ms(ctx, plan)
        trial.set_user_attr("memory_bytes", mem.total_bytes)
        trial.set_user_attr("memory_percent", round(mem.percent, 4))
        trial.set_user_attr("latency_ms", lat)
        trial.set_constraint("memory", float(mem.total_bytes - ctx.budget_bytes))
        if mem.total_bytes > ctx.budget_bytes:
            trial.set_user_attr("feasible", False)
            return objective_values(ctx, WORST_QUALITY, lat, mem.total_bytes)
        try:
            ev = evaluate_plan(ctx, plan)
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{exc.__class__.__name__}: {str(exc)[:300]}")
            raise
        if not math.isfinite(ev.quality):
            trial.set_user_attr("fail_reason", "quality is not finite")
            raise FloatingPointError("quality is not finite")
        trial.set_user_attr("feasible", True)
        trial.set_user_attr("metrics", ev.metrics)
        trial.set_user_attr("apply_s", ev.apply_s)
        trial.set_user_attr("eval_s", ev.eval_s)
        trial.set_user_attr("trial_s", time.perf_counter() - t0)
        return objective_values(ctx, ev.quality, lat, mem.total_bytes)

    return objective


def is_feasible(t: optuna.trial.FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and bool(t.user_attrs.get("feasible"))


def best_quality(study: optuna.Study, ctx: SearchContext) -> float | None:
    qi = ctx.config.objectives.index("quality")
    vals = [t.values[qi] for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    return max(vals) if vals else None


def run_trials(ctx: SearchContext, storage: str, study_name: str, trials: int, timeout: float | None,
               progress: bool = True, single_driver: bool = True, log: Any = None,
               sensitivity_path: Path | None = None) -> optuna.Study:
    """Run until the study holds `trials` evaluated trials, the timeout passes, or INFEASIBLE_CAP x trials
    over-budget samples have been skipped."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(ctx, storage, study_name)
    if single_driver:
        fail_interrupted(study)
    if not study.get_trials(deepcopy=False):
        from slimformer.search.start import enqueue_start_points

        n, sens = enqueue_start_points(ctx, study, log=log)
        if sens is not None and sensitivity_path is not None:
            from slimformer.search.rundir import write_json

            write_json(sensitivity_path, sens.to_json())
    done = counted_trials(study)
    remaining = max(0, trials - done)
    if remaining == 0:
        return study
    skipped_start = infeasible_trials(study)
    cap = INFEASIBLE_CAP * trials
    bar = tqdm(total=remaining, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)

    def callback(st: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
        if ft.user_attrs.get("feasible") is not False:
            bar.update(1)
        best = best_quality(st, ctx)
        skipped = infeasible_trials(st) - skipped_start
        bar.set_postfix_str((f"best {ctx.quality_metric} in budget: {best:.4f}" if best is not None
                             else "no plan in budget yet") + f", {skipped} over budget skipped")
        if counted_trials(st) >= trials or skipped >= cap:
            st.stop()

    try:
        study.optimize(make_objective(ctx), n_trials=None, timeout=timeout, callbacks=[callback],
                       catch=(RuntimeError, FloatingPointError, ValueError, MemoryError))
    finally:
        bar.close()
    return study


def counted_trials(study: optuna.Study) -> int:
    """Finished trials that count toward `trials`: evaluated (or failed) plans; over-budget samples are
    free (never evaluated) and do not count; trials a killed driver left behind do not count."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED
               and t.user_attrs.get("feasible") is not False
               and t.user_attrs.get("fail_reason") != INTERRUPTED)


def infeasible_trials(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("feasible") is False)


def trial_plan(ctx: SearchContext, trial: optuna.trial.FrozenTrial) -> CompressionPlan:
    """Rebuild a trial's plan from its stored parameters."""
    return ctx.space.plan_from_params(trial.params)


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def pareto_trials(study: optuna.Study, ctx: SearchContext) -> list[optuna.trial.FrozenTrial]:
    """Feasible, completed, non-dominated trials (duplicates of the same params collapse to the first)."""
    feas = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    signs = [1.0 if DIRECTIONS[o] == "maximize" else -1.0 for o in ctx.config.objectives]

    def dominates(a: Any, b: Any) -> bool:
        va = [s * v for s, v in zip(signs, a.values)]
        vb = [s * v for s, v in zip(signs, b.values)]
        return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))

    front = [t for t in feas if not any(dominates(o, t) for o in feas if o is not t)]
    seen: set[str] = set()
    out = []
    for t in sorted(front, key=lambda t: t.number):
        key = repr(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
