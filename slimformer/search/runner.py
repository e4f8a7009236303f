"""The Optuna driver: sample a plan, price its memory, evaluate it if it fits, tell the study.

Infeasible plans (over the memory budget) are never evaluated: they are told to the study with a
positive `memory` constraint (Optuna's constrained domination steers away from them) and the worst
quality, and they are never Pareto points. Re-running the same command resumes: finished trials are
kept, trials left RUNNING by a killed driver are marked FAIL and replaced, the total reaches `trials`.

Several drivers (processes, Ray workers) may share one study on a shared storage (search/storage.py):
the start points are queued once per study (`ensure_start_points`), each driver starts a trial only while
the study's counted trials plus the trials running elsewhere stay below `trials` (so the study ends with
exactly `trials` counted trials), and a dead driver's running trial is failed by heartbeat and retried.

Scoring a plan lives in search/evaluate.py, what a trial records in search/records.py.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from slimformer.compression.memory import plan_memory
from slimformer.errors import ConfigError
from slimformer.fileio import write_json
from slimformer.progress import progress_bar
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import evaluate_plan, latency_record, price_latency
from slimformer.search.multifidelity import evaluate_or_prune
from slimformer.search.records import (
    INTERRUPTED,
    SURPLUS,
    StartClaim,
    TrialRecord,
    counted_trials,
    infeasible_trials,
    is_feasible,
    start_claim,
    study_sensitivity,
    write_start_claim,
    write_study_sensitivity,
)
from slimformer.search.repair import BudgetRepairSampler
from slimformer.search.results import DIRECTIONS
from slimformer.search.start import enqueue_start_points
from slimformer.search.storage import GRACE_PERIOD, WORKER_ATTR, default_url, fail_stale_trials, open_storage, worker_id

WORST_QUALITY = -1.0
INFEASIBLE_CAP = 20  # stop after this many over-budget samples per requested trial
START_WAIT_S = 900.0  # longest wait for another driver to queue the start points
POLL_S = 1.0  # how often a driver waiting on other drivers' trials looks at the study


class SurplusTrial(RuntimeError):
    """A trial started after the study's count was already met by trials with lower numbers."""


class _QuietSurplus(logging.Filter):
    """Drop Optuna's two "Trial N failed ..." warnings for surplus trials (they are no failure to report)."""

    def __init__(self) -> None:
        super().__init__()
        self.surplus: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        number = msg.split(" ", 2)[1] if msg.startswith("Trial ") else ""
        if "SurplusTrial" in msg:
            self.surplus.add(number)
            return False
        if number in self.surplus and " failed with value " in msg:
            self.surplus.discard(number)
            return False
        return True


_QUIET = _QuietSurplus()


def quiet_surplus_warnings() -> None:
    """Install the filter on Optuna's trial logger (once; called when trials run, not at import)."""
    logger = logging.getLogger("optuna.study._optimize")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


CATCH = (RuntimeError, FloatingPointError, ValueError, MemoryError)


def make_sampler(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    s = ctx.config.sampler
    base: optuna.samplers.BaseSampler
    if s.name == "nsga2":
        base = optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=s.seed)
    elif s.name == "tpe":
        base = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=min(10, s.population_size))
    else:
        base = optuna.samplers.RandomSampler(seed=s.seed)
    if not s.repair:
        return base
    return BudgetRepairSampler(base, ctx)


def open_study(ctx: SearchContext, storage: str | optuna.storages.BaseStorage, study_name: str,
               label: str | None = None) -> optuna.Study:
    """Create or load the study; `storage` is a URL (opened with storage.open_storage) or a storage
    object (from storage.make_storage; `label` names it in messages)."""
    if isinstance(storage, str):
        label = label or storage
        storage, _ = open_storage(storage)
    label = label or type(storage).__name__
    directions = [DIRECTIONS[o] for o in ctx.config.objectives]
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                    sampler=make_sampler(ctx), load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"storage {label}: {str(exc).splitlines()[0]}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} in {label} has other objectives; use a new --run-dir "
                          "or study_name")
    names = metric_names(ctx)
    if study.metric_names != names:  # optuna-dashboard labels the axes with these instead of "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


def metric_names(ctx: SearchContext) -> list[str]:
    """The study's objective names as Optuna stores them: the quality metric, latency_ms, memory_bytes."""
    names = {"quality": ctx.quality_metric, "latency": "latency_ms", "memory": "memory_bytes"}
    return [names[o] for o in ctx.config.objectives]


def fail_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed driver as FAIL (single-driver storages only)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        TrialRecord(fail_reason=INTERRUPTED).write_to(study._storage, t._trial_id)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


def objective_values(ctx: SearchContext, quality: float, lat: float, mem: int) -> list[float]:
    vals = {"quality": quality, "latency": lat, "memory": float(mem)}
    return [vals[o] for o in ctx.config.objectives]


def make_objective(ctx: SearchContext, limit: int | None = None) -> Callable[[optuna.Trial], list[float]]:
    """The trial function. With `limit` (the study's trial count), a trial that finds the count already met
    by finished trials and running trials numbered below it is surplus: it fails at once with fail_reason
    SURPLUS and does not count (several drivers can start trials in the same instant)."""
    me = worker_id()

    def objective(trial: optuna.Trial) -> list[float]:
        t0 = time.perf_counter()
        trial.study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, me)
        if limit is not None:
            now = trial.study.get_trials(deepcopy=False)
            ahead = sum(1 for t in now if t.number < trial.number and is_in_flight(t))
            if counted_trials(now) + ahead >= limit:
                TrialRecord(fail_reason=SURPLUS).write(trial)
                raise SurplusTrial(SURPLUS)
        plan = ctx.space.suggest(trial)
        mem = plan_memory(ctx.adapter, plan)
        priced = price_latency(ctx, plan)
        lat = priced.ms
        replace(latency_record(priced), memory_bytes=mem.total_bytes, memory_percent=round(mem.percent, 4)).write(trial)
        trial.set_constraint("memory", float(mem.total_bytes - ctx.budget_bytes))
        if mem.total_bytes > ctx.budget_bytes:
            TrialRecord(feasible=False).write(trial)
            return objective_values(ctx, WORST_QUALITY, lat, mem.total_bytes)
        try:
            if ctx.config.multi_fidelity.enabled:
                ev = evaluate_or_prune(ctx, plan, trial, lat, mem.total_bytes)  # raises TrialPruned when dominated
            else:
                ev = evaluate_plan(ctx, plan)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            TrialRecord(fail_reason=f"{exc.__class__.__name__}: {str(exc)[:300]}").write(trial)
            raise
        if not math.isfinite(ev.quality):
            TrialRecord(fail_reason="quality is not finite").write(trial)
            raise FloatingPointError("quality is not finite")
        TrialRecord(feasible=True, metrics=ev.metrics, apply_s=ev.apply_s, eval_s=ev.eval_s,
                    trial_s=time.perf_counter() - t0).write(trial)
        return objective_values(ctx, ev.quality, lat, mem.total_bytes)

    return objective


def best_quality(study: optuna.Study, ctx: SearchContext) -> float | None:
    qi = ctx.config.objectives.index("quality")
    vals = [t.values[qi] for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    return max(vals) if vals else None


def run_trials(ctx: SearchContext, storage: str | optuna.storages.BaseStorage, study_name: str, trials: int,
               timeout: float | None, progress: bool = True, single_driver: bool = True, log: Any = None,
               sensitivity_path: Path | None = None, label: str | None = None) -> optuna.Study:
    """Run until the study holds `trials` evaluated trials, the timeout passes, or INFEASIBLE_CAP x trials
    over-budget samples have been skipped. `single_driver`: this process owns the storage (trials left
    RUNNING are a killed driver's and are failed now); otherwise other drivers may be working on the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(ctx, storage, study_name, label)
    if single_driver:
        fail_interrupted(study)
    ensure_start_points(ctx, study, log=log, sensitivity_path=sensitivity_path)
    return trial_loop(ctx, study, trials, timeout, progress=progress)


def ensure_start_points(ctx: SearchContext, study: optuna.Study, log: Any = None,
                        sensitivity_path: Path | None = None) -> int:
    """Queue the first generation (search/start.py) once per study, whichever driver gets there first.

    A driver claims the job by writing the study user attr START_ATTR and reading it back; one that finds
    it set (or finds trials in the study: a study from before this attr) queues nothing, and waits up to
    START_WAIT_S for the claimant to finish queueing, so that the start points are the first trials run.
    Race (accepted): two drivers that both read "unset" within one storage round trip of each other both
    queue the start points; that evaluates some plans twice, and loses or duplicates no trial.
    Returns how many start points this driver queued.
    """
    say = log or (lambda msg: None)
    queued = 0
    claim = start_claim(study)
    if claim is None and not study.get_trials(deepcopy=False):
        token = f"{worker_id()}:{uuid.uuid4().hex[:8]}"
        write_start_claim(study, StartClaim(token, time.time()))
        if (mine := start_claim(study)) is not None and mine.by == token:
            try:
                try:
                    queued, sens = enqueue_start_points(ctx, study, log=log)
                except CATCH as exc:  # a plan measured for sensitivity failed (e.g. NaN outputs)
                    say(f"start points: sensitivity measurement failed ({exc.__class__.__name__}: "
                        f"{str(exc)[:200]}); using uniform and random start points")
                    plain = replace(ctx, config=ctx.config.model_copy(update={"start_points": "random"}))
                    queued, sens = enqueue_start_points(plain, study, log=log)
                if sens is not None:
                    write_study_sensitivity(study, sens.to_json(), sensitivity_path)
            finally:  # drivers waiting for the start points go on even if this one failed
                write_start_claim(study, StartClaim(token, time.time(), queued))
    elif claim is None:
        write_start_claim(study, StartClaim("none (the study already held trials)", time.time(), 0))
    else:
        t0 = time.monotonic()
        if claim.queued is None:
            say(f"waiting for {claim.by} to queue the start points")
        while (now := start_claim(study)) is not None and now.queued is None and time.monotonic() - t0 < START_WAIT_S:
            time.sleep(POLL_S)
    if sensitivity_path is not None and not sensitivity_path.exists():
        sens_json = study_sensitivity(study)
        if sens_json:
            write_json(sensitivity_path, sens_json)
    return queued


def is_in_flight(t: optuna.trial.FrozenTrial) -> bool:
    """Running now (in any driver) and may still count. A running trial of a slimformer driver is failed by
    heartbeat when its driver dies; one without a driver mark counts only for GRACE_PERIOD s."""
    return t.state == TrialState.RUNNING and (
        WORKER_ATTR in t.system_attrs
        or (t.datetime_start is not None and time.time() - t.datetime_start.timestamp() < GRACE_PERIOD))


def in_flight(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for t in trials if is_in_flight(t))


def trial_loop(ctx: SearchContext, study: optuna.Study, trials: int, timeout: float | None,
               progress: bool = True) -> optuna.Study:
    """Run trials one at a time until the study (all drivers together) counts `trials`."""
    done0 = counted_trials(study)
    remaining = max(0, trials - done0)
    if remaining == 0:
        return study
    deadline = None if timeout is None else time.monotonic() + timeout
    skipped_start = infeasible_trials(study)
    cap = INFEASIBLE_CAP * trials
    objective = make_objective(ctx, limit=trials)
    quiet_surplus_warnings()
    bar = progress_bar(remaining, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)

    def show(st: optuna.Study, done: int, skipped: int) -> None:
        bar.update(max(0, min(done, trials) - done0 - bar.n))
        best = best_quality(st, ctx)
        bar.set_postfix_str((f"best {ctx.quality_metric} in budget: {best:.4f}" if best is not None
                             else "no plan in budget yet") + f", {skipped} over budget skipped")

    try:
        while True:
            now = study.get_trials(deepcopy=False)
            done = counted_trials(now)
            skipped = infeasible_trials(now) - skipped_start
            show(study, done, skipped)
            if done >= trials or skipped >= cap or (deadline is not None and time.monotonic() >= deadline):
                break
            if done + in_flight(now) >= trials:
                # the trials other drivers are running may complete the count: wait for them (a dead
                # driver's trial is failed by heartbeat and re-queued, then this driver runs it)
                fail_stale_trials(study)
                time.sleep(POLL_S)
                continue
            study.optimize(objective, n_trials=1, catch=CATCH)
    finally:
        bar.close()
    return study


def default_storage(run_dir: Path) -> str:
    """URL of the run directory's own SQLite study (storage.default_url)."""
    return default_url(run_dir)
