"""The Optuna driver: sample a plan, price its memory, evaluate it if it fits, tell the study.

Infeasible plans (over the memory budget, or over budget.latency when set) are never evaluated: they are told
to the study with a positive `memory` / `latency` constraint (Optuna's constrained domination steers away from
them) and the worst quality, and they are never Pareto points. Re-running the same command resumes: finished trials are
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
import threading
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
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.errors import ConfigError
from slimformer.fileio import write_json
from slimformer.progress import progress_bar
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import evaluate_plan, latency_record, price_latency
from slimformer.search.multifidelity import evaluate_or_prune
from slimformer.search.pause import pause_at
from slimformer.search.records import (
    INTERRUPTED,
    SURPLUS,
    StartClaim,
    TrialRecord,
    counted_trials,
    duplicate_trials,
    infeasible_trials,
    is_duplicate,
    is_feasible,
    start_claim,
    study_sensitivity,
    write_start_claim,
    write_study_sensitivity,
)
from slimformer.search.repair import BudgetRepairSampler
from slimformer.search.results import DIRECTIONS
from slimformer.search.start import enqueue_start_points
from slimformer.search.storage import (
    GRACE_PERIOD,
    WORKER_ATTR,
    default_url,
    fail_stale_trials,
    hide_password,
    open_storage,
    worker_id,
)

WORST_QUALITY = -1.0
INFEASIBLE_CAP = 20  # stop after this many over-budget samples per requested trial
START_WAIT_S = 900.0  # longest wait for another (live) driver to queue the start points
START_BEAT_S = 5.0  # the start-point claimant refreshes its claim this often
START_STALE_S = 3 * START_BEAT_S  # an unfinished claim without a heartbeat for this long is taken over
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
               label: str | None = None, read_only: bool = False) -> optuna.Study:
    """Create or load the study; `storage` is a URL (opened with storage.open_storage) or a storage
    object (from storage.make_storage; `label` names it in messages). `read_only` (report, export-recipe):
    an existing study is not changed (its metric names are set by the search that runs it)."""
    if isinstance(storage, str):
        label = label or hide_password(storage)
        storage, _ = open_storage(storage)
    label = label or type(storage).__name__
    directions = [DIRECTIONS[o] for o in ctx.config.objectives]
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                    sampler=make_sampler(ctx), load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"storage {label}: {hide_password(str(exc).splitlines()[0])}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} in {label} has other objectives; use a new --run-dir "
                          "or study_name")
    names = metric_names(ctx)
    if not read_only and study.metric_names != names:  # optuna-dashboard labels axes with these, not "Objective 0"
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


def set_constraints(ctx: SearchContext, trial: optuna.Trial, memory_bytes: int, latency_ms: float) -> None:
    """The trial's Optuna constraints (positive = violated), the same names on every priced trial of a study:
    `memory` (bytes over budget) and, with a latency budget, `latency` (ms over budget)."""
    trial.set_constraint("memory", float(memory_bytes - ctx.budget_bytes))
    if ctx.latency_budget_ms is not None:
        trial.set_constraint("latency", float(latency_ms - ctx.latency_budget_ms))


def make_objective(ctx: SearchContext, limit: int | None = None) -> Callable[[optuna.Trial], list[float]]:
    """The trial function. With `limit` (the study's trial count), a trial that finds the count already met
    by finished trials and running trials numbered below it is surplus: it fails at once with fail_reason
    SURPLUS and does not count (several drivers can start trials in the same instant)."""
    me = worker_id()
    evaluated = EvaluatedPlans(ctx)

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
        set_constraints(ctx, trial, mem.total_bytes, lat)
        if over := ctx.over_budget(mem.total_bytes, lat):
            TrialRecord(feasible=False, over_budget="+".join(over)).write(trial)
            return objective_values(ctx, WORST_QUALITY, lat, mem.total_bytes)
        answer_if_duplicate(trial, plan, evaluated)  # a plan the study has evaluated: PRUNED, not counted
        pause_at("trial", lambda: counted_trials(trial.study) >= 2)
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


class EvaluatedPlans:
    """The canonical plans of the study's evaluated (complete, feasible, not duplicate) trials, read
    incrementally: one decoding per trial per driver."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.read: set[int] = set()
        self.plans: list[tuple[CompressionPlan, int, TrialRecord]] = []

    def find(self, study: optuna.Study, plan: CompressionPlan, number: int) -> tuple[int, TrialRecord] | None:
        """(number, record) of the first evaluated trial whose plan means the same as `plan` (canonical form)."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self.read or t.number == number:
                continue
            self.read.add(t.number)
            if is_feasible(t) and not is_duplicate(t):
                try:
                    self.plans.append((canonical_plan(self.ctx.adapter, self.ctx.space.plan_from_params(t.params)),
                                       t.number, TrialRecord.from_trial(t)))
                except (KeyError, ValueError):  # params of another space: never the same plan
                    continue
        mine = canonical_plan(self.ctx.adapter, plan)
        return min(((n, r) for p, n, r in self.plans if p == mine), key=lambda x: x[0], default=None)


def answer_if_duplicate(trial: optuna.Trial, plan: CompressionPlan, evaluated: EvaluatedPlans) -> None:
    """No plan is evaluated twice: a plan some finished trial of the study already evaluated gets that
    trial's metrics and `duplicate_of`, and the trial ends PRUNED (not counted toward `trials`, never on the
    Pareto front, no duplicate individual in NSGA-II's population; the sampler simply draws again)."""
    found = evaluated.find(trial.study, plan, trial.number)
    if found is None:
        return
    twin, rec = found
    TrialRecord(feasible=True, metrics=rec.metrics, duplicate_of=twin).write(trial)
    raise optuna.TrialPruned(f"same plan as trial {twin}")


def best_quality(study: optuna.Study, ctx: SearchContext) -> float | None:
    qi = ctx.config.objectives.index("quality")
    vals = [t.values[qi] for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    return max(vals) if vals else None


def run_trials(ctx: SearchContext, storage: str | optuna.storages.BaseStorage, study_name: str, trials: int,
               timeout: float | None, progress: bool = True, single_driver: bool = True, log: Any = None,
               sensitivity_path: Path | None = None, label: str | None = None) -> optuna.Study:
    """Run until the study holds `trials` evaluated trials, the timeout passes, or INFEASIBLE_CAP x trials
    over-budget or already-evaluated (duplicate) samples have been skipped. `single_driver`: this process owns
    the storage (trials left RUNNING are a killed driver's and are failed now, an unfinished start-point claim is
    taken over at once); otherwise other drivers may be working on the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(ctx, storage, study_name, label)
    if single_driver:
        fail_interrupted(study)
    ensure_start_points(ctx, study, log=log, sensitivity_path=sensitivity_path, exclusive=single_driver)
    return trial_loop(ctx, study, trials, timeout, progress=progress)


def ensure_start_points(ctx: SearchContext, study: optuna.Study, log: Any = None,
                        sensitivity_path: Path | None = None, exclusive: bool = False) -> int:
    """Queue the first generation (search/start.py) once per study, whichever driver gets there first.

    A driver claims the job by writing the study user attr START_ATTR and reading it back; the claim carries a
    heartbeat (`beat`, refreshed every START_BEAT_S s while the claimant measures and queues). A claim that is
    not finished (`queued` None) is taken over at once by an `exclusive` driver (it holds the run directory's
    lock, so the claimant is a killed earlier driver) and by any driver once its heartbeat is START_STALE_S s
    old (its claimant died); the new claimant queues only the start points the study does not hold yet, and
    writes the sensitivity table. A driver that finds an unfinished live claim waits for it (at most
    START_WAIT_S s), so that the start points are the first trials run; a study that already held trials
    before any claim (made before this attr, or trials queued by hand) gets none.
    Race (accepted): two drivers that both read "unset" (or "stale") within one storage round trip of each
    other both queue; points already in the study are skipped, and a plan queued twice is answered from the
    first evaluation (the objective's duplicate check), so no trial is lost, duplicated or evaluated twice.
    Returns how many start points this driver queued.
    """
    say = log or (lambda msg: None)
    queued = 0
    t0 = time.monotonic()
    told = False
    while True:
        claim = start_claim(study)
        if claim is None and study.get_trials(deepcopy=False):
            write_start_claim(study, StartClaim("none (the study already held trials)", time.time(), 0))
            break
        if claim is not None and claim.queued is not None:
            break
        if claim is None or exclusive or time.time() - claim.last_sign_of_life() > START_STALE_S:
            if claim is not None:
                say(f"start points: taking over the unfinished claim of {claim.by} (its driver stopped)")
            taken = _claim_and_queue(ctx, study, say, sensitivity_path)
            if taken is not None:
                queued = taken
                break
        elif not told:
            say(f"waiting for {claim.by} to queue the start points")
            told = True
        if time.monotonic() - t0 > START_WAIT_S:
            say("start points: gave up waiting for the other driver; going on without waiting")
            break
        time.sleep(POLL_S)
    if sensitivity_path is not None and not sensitivity_path.exists():
        sens_json = study_sensitivity(study)
        if sens_json:
            write_json(sensitivity_path, sens_json)
    return queued


def _claim_and_queue(ctx: SearchContext, study: optuna.Study, say: Callable[[str], None],
                     sensitivity_path: Path | None = None) -> int | None:
    """Claim the start points and queue them, with a heartbeat thread on the claim; None: another driver's
    claim won the read-back. The sensitivity table goes to the study (or `sensitivity_path`, see
    records.write_study_sensitivity)."""
    token = f"{worker_id()}:{uuid.uuid4().hex[:8]}"
    at = time.time()
    write_start_claim(study, StartClaim(token, at, None, at))
    if (mine := start_claim(study)) is None or mine.by != token:
        return None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(START_BEAT_S):
            try:
                write_start_claim(study, StartClaim(token, at, None, time.time()))
            except Exception:  # a storage hiccup: the next beat tries again
                pass

    beater = threading.Thread(target=beat, name="slimformer-start-claim", daemon=True)
    beater.start()
    queued = 0
    try:
        try:
            queued, sens = enqueue_start_points(ctx, study, log=say)
        except CATCH as exc:  # a plan measured for sensitivity failed (e.g. NaN outputs)
            say(f"start points: sensitivity measurement failed ({exc.__class__.__name__}: "
                f"{str(exc)[:200]}); using uniform and random start points")
            plain = replace(ctx, config=ctx.config.model_copy(update={"start_points": "random"}))
            queued, sens = enqueue_start_points(plain, study, log=say)
        if sens is not None:
            write_study_sensitivity(study, sens.to_json(), sensitivity_path)
    finally:  # drivers waiting for the start points go on even if this one failed
        stop.set()
        beater.join()
        write_start_claim(study, StartClaim(token, at, queued, time.time()))
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
    skipped_start = infeasible_trials(study) + duplicate_trials(study)
    cap = INFEASIBLE_CAP * trials
    objective = make_objective(ctx, limit=trials)
    quiet_surplus_warnings()
    bar = progress_bar(remaining, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)

    def show(st: optuna.Study, done: int, skipped: int) -> None:
        bar.update(max(0, min(done, trials) - done0 - bar.n))
        best = best_quality(st, ctx)
        bar.set_postfix_str((f"best {ctx.quality_metric} in budget: {best:.4f}" if best is not None
                             else "no plan in budget yet") + f", {skipped} over budget or already evaluated skipped")

    try:
        while True:
            now = study.get_trials(deepcopy=False)
            done = counted_trials(now)
            skipped = infeasible_trials(now) + duplicate_trials(now) - skipped_start
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
