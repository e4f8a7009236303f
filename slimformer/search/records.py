"""What a search stores in its Optuna study, in one place: the trial record (trial user attrs) and the two
study user attrs (start-point claim, sensitivity table or a pointer to its file).

Every read or write of those attr names goes through this module, so the schema lives here only. A trial's
record is written piecewise while it runs (memory and latency first, then the evaluation or the failure);
each piece is a `TrialRecord` holding just the fields known at that point (`None` fields are not written).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from slimformer.fileio import write_json

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

# fail_reason values; was_interrupted() recognises the "interrupted" prefix (such trials do not count)
INTERRUPTED = "interrupted (driver stopped)"
SURPLUS = "interrupted (surplus: other drivers' trials completed the study's count as this one started)"
STALE = "interrupted (worker stopped sending heartbeats)"

START_ATTR = "slimformer_start_points"  # study user attr: {"by", "at", "beat": last heartbeat, "queued": n or None}
SENSITIVITY_ATTR = "slimformer_sensitivity"  # study user attr: the sensitivity table, or a pointer to its file


@dataclass(frozen=True)
class TrialRecord:
    """A trial's user attrs, typed. Field names are the stored attr names; `None` means "not recorded"."""

    start_point: str | None = None  # queued start point: its source (uniform, sensitivity-greedy, ...)
    repaired_steps: int | None = None  # budget repair moved this many parameters one step down
    memory_bytes: int | None = None
    memory_percent: float | None = None
    latency_ms: float | None = None  # the latency objective, however priced
    latency_source: str | None = None  # measured latency only: where the value came from, and its spread
    latency_iqr_ms: float | None = None
    latency_runs: int | None = None
    latency_threads: int | None = None
    latency_kernels: str | None = None
    feasible: bool | None = None  # False: over the memory or the latency budget, never evaluated
    over_budget: str | None = None  # which budgets an infeasible plan broke: memory, latency or memory+latency
    slice_quality: float | None = None  # multi-fidelity: quality on the first slice of the search data
    metrics: dict[str, float] | None = None  # search-set metrics of an evaluated plan
    apply_s: float | None = None
    eval_s: float | None = None
    trial_s: float | None = None
    pruned_s: float | None = None
    pruned_reason: str | None = None
    fail_reason: str | None = None
    duplicate_of: int | None = None  # same plan as this finished trial: answered from it (PRUNED, not counted)
    # recover_in_search (search/recover_stage.py): this trial is trial `recovered_from`'s plan after a short
    # distillation; `metrics` are its search-set metrics after it, `unrecovered_metrics` those before (not counted)
    recovered_from: int | None = None
    recovery_key: str | None = None  # digest of the plan's params and the recovery settings
    recovery_steps: int | None = None
    recovery_s: float | None = None
    recovery_samples: int | None = None  # training samples the distillation went through
    unrecovered_metrics: dict[str, float] | None = None

    @classmethod
    def from_user_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        """The record in a user-attr mapping (attrs this schema does not know are ignored)."""
        return cls(**{k: attrs[k] for k in _FIELDS if k in attrs})

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        return cls.from_user_attrs(trial.user_attrs)

    def to_user_attrs(self) -> dict[str, Any]:
        """The recorded (not None) fields, by attr name."""
        return {k: v for k in _FIELDS if (v := getattr(self, k)) is not None}

    def write(self, trial: optuna.Trial) -> None:
        """Record these fields on a running trial."""
        for k, v in self.to_user_attrs().items():
            trial.set_user_attr(k, v)

    def write_to(self, storage: BaseStorage, trial_id: int) -> None:
        """Record these fields through the storage (samplers and storages hold a trial id, not a Trial)."""
        for k, v in self.to_user_attrs().items():
            storage.set_trial_user_attr(trial_id, k, v)

    @property
    def evaluated(self) -> bool:
        """Fully scored (its trial time is recorded): what the summary's timing means are over."""
        return self.trial_s is not None


_FIELDS = tuple(f.name for f in fields(TrialRecord))


def retry_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The user attrs a retried trial carries over from the stale one: its start-point label only."""
    return TrialRecord(start_point=TrialRecord.from_user_attrs(attrs).start_point).to_user_attrs()


def is_feasible(t: FrozenTrial) -> bool:
    """Completed, within the memory and latency budgets and no Optuna constraint violated: a candidate for the
    Pareto front."""
    return (t.state == TrialState.COMPLETE and bool(TrialRecord.from_trial(t).feasible)
            and all(v <= 0 for v in t.constraints.values()))


def is_infeasible(t: FrozenTrial) -> bool:
    """Sampled over the memory or latency budget (never evaluated)."""
    return TrialRecord.from_trial(t).feasible is False


def was_interrupted(t: FrozenTrial) -> bool:
    """Failed because its driver died (killed exclusive driver, or a worker without heartbeat)."""
    return str(TrialRecord.from_trial(t).fail_reason or "").startswith("interrupted")


def is_duplicate(t: FrozenTrial) -> bool:
    """A plan already evaluated in the study, answered from that trial instead of evaluated again."""
    return TrialRecord.from_trial(t).duplicate_of is not None


def counted(t: FrozenTrial) -> bool:
    """Counts toward `trials`: finished, not an over-budget sample, not a duplicate plan, not a recovered copy of
    a trial (recover_in_search), not left behind by a killed driver."""
    rec = TrialRecord.from_trial(t)
    return (t.state in FINISHED and rec.feasible is not False and rec.duplicate_of is None
            and rec.recovered_from is None and not was_interrupted(t))


def is_recovered(t: FrozenTrial) -> bool:
    """A trial recover_in_search added: another trial's plan scored after a short distillation."""
    return TrialRecord.from_trial(t).recovered_from is not None


def _trials(study: optuna.Study | Iterable[FrozenTrial]) -> Iterable[FrozenTrial]:
    return study.get_trials(deepcopy=False) if isinstance(study, optuna.Study) else study


def counted_trials(study: optuna.Study | Iterable[FrozenTrial]) -> int:
    """Finished trials that count toward `trials`: evaluated (or failed) plans; over-budget samples are
    free (never evaluated) and do not count; trials a killed driver left behind do not count."""
    return sum(1 for t in _trials(study) if counted(t))


def infeasible_trials(study: optuna.Study | Iterable[FrozenTrial]) -> int:
    return sum(1 for t in _trials(study) if is_infeasible(t))


def duplicate_trials(study: optuna.Study | Iterable[FrozenTrial]) -> int:
    return sum(1 for t in _trials(study) if is_duplicate(t))


# -- study user attrs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartClaim:
    """Which driver queues the start points (study attr START_ATTR); `queued` None while it is queueing.
    `beat` (time.time()) is refreshed while the claimant works, so a dead claimant's claim goes stale."""

    by: str
    at: float
    queued: int | None = None
    beat: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "at": self.at, "queued": self.queued, "beat": self.beat}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StartClaim:
        at = float(data.get("at") or 0.0)
        beat = data.get("beat")
        return cls(str(data.get("by")), at, data.get("queued"), at if beat is None else float(beat))

    def last_sign_of_life(self) -> float:
        return self.at if self.beat is None else max(self.at, self.beat)


def start_claim(study: optuna.Study) -> StartClaim | None:
    raw = study.user_attrs.get(START_ATTR)
    return None if raw is None else StartClaim.from_json(raw)


def write_start_claim(study: optuna.Study, claim: StartClaim) -> None:
    study.set_user_attr(START_ATTR, claim.to_json())


def _sqlite_dir(study: optuna.Study) -> Path | None:
    """The folder of the study's SQLite file, or None for any other storage (a server, a journal, memory)."""
    storage = getattr(study._storage, "_backend", study._storage)  # optuna wraps RDBStorage in a cache
    url = getattr(storage, "url", None)
    if not isinstance(url, str) or not url.startswith("sqlite:///") or ":memory:" in url:
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0]).resolve().parent


def _digest(table: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def study_sensitivity(study: optuna.Study) -> dict[str, Any] | None:
    """The sensitivity table the start points measured (start.Sensitivity.to_json), or None (also when the
    attr points to a file that is missing or was changed: the search then repairs plans without it)."""
    raw = study.user_attrs.get(SENSITIVITY_ATTR)
    if isinstance(raw, dict) and set(raw) == {"file", "sha256"}:
        path = Path(raw["file"])
        if not path.is_absolute():
            base = _sqlite_dir(study)
            if base is None:
                return None
            path = base / path
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return table if isinstance(table, dict) and _digest(table) == raw["sha256"] else None
    return raw or None


def write_study_sensitivity(study: optuna.Study, table: dict[str, Any], path: Path | None = None) -> None:
    """Store the sensitivity table for every driver of the study.

    With `path` (the run directory's sensitivity.json) and a SQLite study, the table goes to that file and the
    study keeps only a pointer {file, sha256} (the file relative to the SQLite file's folder when it lies under
    it, so a moved run directory still resolves): SQLite is one machine's file, so every driver can read the
    run directory, and optuna-dashboard shows a small attr instead of a large blob. Any other storage (a
    database server, a journal file that may sit on a shared file system, memory) keeps the whole table in the
    study: drivers on other machines may not see this run directory.
    """
    base = _sqlite_dir(study) if path is not None else None
    if path is None or base is None:
        study.set_user_attr(SENSITIVITY_ATTR, table)
        return
    write_json(path, table)
    full = path.resolve()
    shown = str(full.relative_to(base)) if full.is_relative_to(base) else str(full)
    study.set_user_attr(SENSITIVITY_ATTR, {"file": shown, "sha256": _digest(table)})
