"""What a search reports, typed: the Pareto front (pareto.json), the summary (summary.json), the baselines and
the provenance its recipes carry.

`to_json()` gives exactly the files' content (same keys, same order); `from_json()` reads it back. Keys named
after the quality metric (`heldout_<metric>`, `before_<metric>`, ...) are built here only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from slimformer import __version__
from slimformer.compression.records import RecoveryRecord
from slimformer.search.records import TrialRecord, is_feasible

DIRECTIONS = {"quality": "maximize", "latency": "minimize", "memory": "minimize"}


def pareto_trials(study: optuna.Study, objectives: list[str]) -> list[optuna.trial.FrozenTrial]:
    """Feasible (within the memory and latency budgets: `is_feasible`), completed, non-dominated trials
    (duplicates of the same params collapse to the first)."""
    feas = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    signs = [1.0 if DIRECTIONS[o] == "maximize" else -1.0 for o in objectives]

    def dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
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


@dataclass
class BaselineResult:
    """One uniform baseline as baselines.json stores it (asdict is the file's entry). `fits`: within every budget
    (memory, and latency when budget.latency is set); only baselines that fit are evaluated and compared."""

    name: str
    memory_bytes: int
    memory_percent: float
    fits: bool
    latency_ms: float | None = None
    search_metrics: dict[str, float] | None = None
    heldout_metrics: dict[str, float] | None = None
    error: str | None = None
    over_budget: str | None = None  # not fitting: the budgets it breaks (memory, latency or memory+latency)


@dataclass(frozen=True)
class ParetoEntry:
    """One Pareto trial in pareto.json: its memory, latency, metrics (search and held-out) and plan."""

    trial: int
    memory_bytes: int
    memory_percent: float
    latency_ms_estimate: float  # the latency objective, however priced
    search_metrics: dict[str, float]
    heldout_metrics: dict[str, float]
    params: dict[str, Any]  # the trial's Optuna parameters
    plan: dict[str, Any]  # the plan as JSON (rundir.plan_summary): units, layers, sharing
    recipe: str  # path relative to the run directory
    latency_source: str | None = None  # measured latency only
    latency_iqr_ms: float | None = None
    recovery: RecoveryRecord | None = None  # held-out metrics before/after distillation
    recovered_from: int | None = None  # recover_in_search: the trial whose plan this is, before distillation
    unrecovered_search_metrics: dict[str, float] | None = None  # recover_in_search: search-set metrics before it

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial, plan: dict[str, Any], heldout: dict[str, float],
                   recovery: RecoveryRecord | None = None) -> ParetoEntry:
        rec = TrialRecord.from_trial(t)
        assert rec.memory_bytes is not None and rec.memory_percent is not None and rec.latency_ms is not None
        return cls(t.number, rec.memory_bytes, rec.memory_percent, rec.latency_ms, rec.metrics or {}, heldout,
                   t.params, plan, f"recipes/trial-{t.number}.yaml", rec.latency_source, rec.latency_iqr_ms,
                   recovery, rec.recovered_from, rec.unrecovered_metrics)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.trial, "memory_bytes": self.memory_bytes,
                               "memory_percent": self.memory_percent,
                               "latency_ms_estimate": self.latency_ms_estimate}
        if self.latency_source is not None:
            out["latency_source"] = self.latency_source
        if self.latency_iqr_ms is not None:
            out["latency_iqr_ms"] = self.latency_iqr_ms
        out |= {"search_metrics": self.search_metrics, "heldout_metrics": self.heldout_metrics,
                "params": self.params, "plan": self.plan, "recipe": self.recipe}
        if self.recovery is not None:
            out["recovery"] = self.recovery.model_dump(mode="json")
        if self.recovered_from is not None:
            out["recovered_from"] = self.recovered_from
            out["unrecovered_search_metrics"] = self.unrecovered_search_metrics
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ParetoEntry:
        rec = d.get("recovery")
        return cls(d["trial"], d["memory_bytes"], d["memory_percent"], d["latency_ms_estimate"], d["search_metrics"],
                   d["heldout_metrics"], d["params"], d["plan"], d["recipe"], d.get("latency_source"),
                   d.get("latency_iqr_ms"), None if rec is None else RecoveryRecord.model_validate(rec),
                   d.get("recovered_from"), d.get("unrecovered_search_metrics"))


@dataclass(frozen=True)
class LatencyBudget:
    """budget.latency as a search resolved it: the ms limit, the fp32 model's latency (a relative budget's
    reference), the priced shape and what priced it (pareto.json / summary.json `latency_budget`)."""

    ms: float
    spec: str  # as configured: '8ms', '0.5x'
    fp32_ms: float | None
    batch: int
    seq: int
    source: str  # the resolved latency source (estimate, calibrated, measured)

    def to_json(self) -> dict[str, Any]:
        return {"ms": self.ms, "spec": self.spec, "fp32_ms": self.fp32_ms, "batch": self.batch, "seq": self.seq,
                "source": self.source}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> LatencyBudget | None:
        return None if d is None else cls(d["ms"], d["spec"], d.get("fp32_ms"), d["batch"], d["seq"], d["source"])


@dataclass(frozen=True)
class ParetoFront:
    """pareto.json: the objectives, quality metric, budgets and every feasible Pareto trial (`latency_budget`
    only when budget.latency is set: every entry's `latency_ms_estimate` is within its `ms`)."""

    objectives: list[str]
    quality_metric: str
    budget_bytes: int
    fp32_bytes: int
    trials: list[ParetoEntry]
    latency_budget: LatencyBudget | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objectives": self.objectives, "quality_metric": self.quality_metric,
                               "budget_bytes": self.budget_bytes, "fp32_bytes": self.fp32_bytes}
        if self.latency_budget is not None:
            out["latency_budget"] = self.latency_budget.to_json()
        return out | {"trials": [e.to_json() for e in self.trials]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ParetoFront:
        return cls(list(d["objectives"]), d["quality_metric"], d["budget_bytes"], d["fp32_bytes"],
                   [ParetoEntry.from_json(e) for e in d["trials"]], LatencyBudget.from_json(d.get("latency_budget")))


@dataclass(frozen=True)
class BestRecipe:
    """The Pareto trial with the best held-out quality (summary.json `best_recipe`)."""

    trial: int
    recipe: str
    memory_percent: float
    heldout_quality: float  # written as heldout_<quality metric>
    heldout_metrics: dict[str, float]

    def to_json(self, metric: str) -> dict[str, Any]:
        return {"trial": self.trial, "recipe": self.recipe, "memory_percent": self.memory_percent,
                f"heldout_{metric}": self.heldout_quality, "heldout_metrics": self.heldout_metrics}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], metric: str) -> BestRecipe:
        return cls(d["trial"], d["recipe"], d["memory_percent"], d[f"heldout_{metric}"], d["heldout_metrics"])


@dataclass(frozen=True)
class BestBaseline:
    """The fitting uniform baseline with the best held-out quality (summary.json `best_baseline`)."""

    name: str
    memory_percent: float
    heldout_quality: float  # written as heldout_<quality metric>
    heldout_metrics: dict[str, float]

    def to_json(self, metric: str) -> dict[str, Any]:
        return {"name": self.name, "memory_percent": self.memory_percent, f"heldout_{metric}": self.heldout_quality,
                "heldout_metrics": self.heldout_metrics}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], metric: str) -> BestBaseline:
        return cls(d["name"], d["memory_percent"], d[f"heldout_{metric}"], d["heldout_metrics"])


@dataclass(frozen=True)
class RecoveredTrial:
    """Held-out quality of one recovered Pareto trial before and after distillation."""

    trial: int
    before: float | None  # written as before_<quality metric>
    after: float | None  # written as after_<quality metric>
    steps: int
    seconds: float

    def to_json(self, metric: str) -> dict[str, Any]:
        return {"trial": self.trial, f"before_{metric}": self.before, f"after_{metric}": self.after,
                "steps": self.steps, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], metric: str) -> RecoveredTrial:
        return cls(d["trial"], d.get(f"before_{metric}"), d.get(f"after_{metric}"), d["steps"], d["seconds"])


@dataclass(frozen=True)
class RecoverySummary:
    """The recovery stage's result in summary.json: every recovered trial and the best one after recovery."""

    trials: list[RecoveredTrial]
    best_trial: int
    best_after: float | None  # written as best_after_<quality metric>
    settings: dict[str, Any]  # the RecoveryRecord settings (a recovery config as JSON)

    def to_json(self, metric: str) -> dict[str, Any]:
        return {"trials": [r.to_json(metric) for r in self.trials], "best_trial": self.best_trial,
                f"best_after_{metric}": self.best_after, "settings": self.settings}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], metric: str) -> RecoverySummary:
        return cls([RecoveredTrial.from_json(r, metric) for r in d["trials"]], d["best_trial"],
                   d.get(f"best_after_{metric}"), d["settings"])


@dataclass(frozen=True)
class SearchSummary:
    """summary.json: budget, trial states and timings, best recipe vs best baseline on held-out data."""

    model: str
    quality_metric: str
    budget_bytes: int
    budget_percent: float
    fp32_bytes: int
    trial_states: dict[str, int]
    infeasible_trials: int
    evaluated_trials: int
    pruned_trials: int  # multi-fidelity: stopped after the slice (search/multifidelity.py)
    mean_pruned_trial_s: float | None
    elapsed_s: float
    mean_trial_s: float | None
    mean_eval_s: float | None
    mean_outside_forward_s: float | None
    best_recipe: BestRecipe | None
    best_baseline: BestBaseline | None
    latency_label: str
    latency_source: str
    hardware_profile: str
    hardware_profile_version: str | None
    recovery: RecoverySummary | None = None
    duplicate_trials: int = 0  # plans sampled again, answered from the trial that evaluated them (PRUNED)
    latency_budget: LatencyBudget | None = None  # written only when budget.latency is set

    def to_json(self) -> dict[str, Any]:
        m = self.quality_metric
        out = {
            "model": self.model, "quality_metric": m, "budget_bytes": self.budget_bytes,
            "budget_percent": self.budget_percent, "fp32_bytes": self.fp32_bytes, "trial_states": self.trial_states,
            "infeasible_trials": self.infeasible_trials, "evaluated_trials": self.evaluated_trials,
            "pruned_trials": self.pruned_trials, "duplicate_trials": self.duplicate_trials,
            "mean_pruned_trial_s": self.mean_pruned_trial_s,
            "elapsed_s": self.elapsed_s, "mean_trial_s": self.mean_trial_s, "mean_eval_s": self.mean_eval_s,
            "mean_outside_forward_s": self.mean_outside_forward_s,
            "best_recipe": None if self.best_recipe is None else self.best_recipe.to_json(m),
            "best_baseline": None if self.best_baseline is None else self.best_baseline.to_json(m),
            "latency_label": self.latency_label, "latency_source": self.latency_source,
            "hardware_profile": self.hardware_profile, "hardware_profile_version": self.hardware_profile_version,
            "recovery": None if self.recovery is None else self.recovery.to_json(m),
        }
        if self.latency_budget is not None:
            out["latency_budget"] = self.latency_budget.to_json()
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SearchSummary:
        m = d["quality_metric"]
        best, base, rec = d.get("best_recipe"), d.get("best_baseline"), d.get("recovery")
        return cls(d["model"], m, d["budget_bytes"], d["budget_percent"], d["fp32_bytes"], dict(d["trial_states"]),
                   d["infeasible_trials"], d["evaluated_trials"], d["pruned_trials"], d["mean_pruned_trial_s"],
                   d["elapsed_s"], d["mean_trial_s"], d["mean_eval_s"], d["mean_outside_forward_s"],
                   None if best is None else BestRecipe.from_json(best, m),
                   None if base is None else BestBaseline.from_json(base, m),
                   d["latency_label"], d["latency_source"], d["hardware_profile"], d["hardware_profile_version"],
                   None if rec is None else RecoverySummary.from_json(rec, m),
                   int(d.get("duplicate_trials", 0)), LatencyBudget.from_json(d.get("latency_budget")))


@dataclass(frozen=True)
class RecipeProvenance:
    """Where a search's recipe came from (Recipe.provenance): the study, the trial and its scores, versions.

    Written by the run directory (every Pareto trial, with held-out metrics) and by `export_recipe` (any
    feasible trial; held-out metrics only when known)."""

    study: str
    storage: str
    trial: int
    memory_bytes: int
    memory_percent: float | None
    latency_ms_estimate: float
    search_metrics: dict[str, float]
    heldout_metrics: dict[str, float] | None = None
    versions: dict[str, str] = field(default_factory=lambda: versions())
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    budget_bytes: int | None = None  # the search's budget.memory in bytes (apply --onnx checks the file against it)
    deploy: str | None = None  # the artifact the budget applies to: onnx | safetensors

    @classmethod
    def of_trial(cls, study: str, storage: str, t: optuna.trial.FrozenTrial,
                 heldout: dict[str, float] | None = None, budget_bytes: int | None = None,
                 deploy: str | None = None) -> RecipeProvenance:
        rec = TrialRecord.from_trial(t)
        assert rec.memory_bytes is not None and rec.latency_ms is not None
        return cls(study, storage, t.number, rec.memory_bytes, rec.memory_percent, rec.latency_ms,
                   rec.metrics or {}, heldout, budget_bytes=budget_bytes, deploy=deploy)

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {"memory_bytes": self.memory_bytes}
        if self.memory_percent is not None:
            metrics["memory_percent"] = self.memory_percent
        metrics["latency_ms_estimate"] = self.latency_ms_estimate
        metrics |= {f"search_{k}": v for k, v in self.search_metrics.items()}
        metrics |= {f"heldout_{k}": v for k, v in (self.heldout_metrics or {}).items()}
        out = {"study": self.study, "storage": self.storage, "trial": self.trial, "metrics": metrics,
               "versions": self.versions, "created": self.created}
        if self.budget_bytes is not None:
            out["budget"] = {"bytes": self.budget_bytes, "deploy": self.deploy or "safetensors"}
        return out


def versions() -> dict[str, str]:
    """Versions of the packages a recipe's numbers depend on."""
    import torch
    import transformers

    return {"slimformer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "optuna": optuna.__version__}
