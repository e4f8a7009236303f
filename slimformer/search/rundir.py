"""The run directory: config, study, baselines, Pareto front, recipes, summary and report.

  config.yaml        the resolved config (a re-run with another model/space/budget is refused)
  study.db           the Optuna study (default SQLite storage)
  baselines.json     uniform baselines: memory, latency, fit (over_budget: which budget a misfit breaks), metrics
  heldout.json       held-out metrics of Pareto trials (cached across re-runs)
  pareto.json        every feasible Pareto trial: metrics (search + held-out) and plan
  pareto.png         quality vs memory and vs latency: the held-out front, the search-set cloud, the baselines
  report.html        verdict, next-step commands, every Pareto plan (recipe links, per-layer choices), baselines,
                     where the latency numbers come from
  bench.json         `report --bench N` only: measured latency of the N best plans
  recipes/trial-N.yaml  one recipe per Pareto trial
  recovered/trial-N/    recover_in_search only: the compressed model directory of recovered trial N
  summary.json       best recipe vs best baseline on held-out data, timings
  splits.json        the calibration, search and held-out samples (source, seed, sizes, a fingerprint per sample):
                     three disjoint sets, so calibration data never scores a trial
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from slimformer.compression.embedding_tiers import layout_text
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.recipe import Recipe
from slimformer.errors import ConfigError
from slimformer.evaluators.latency import MEASURED_LABEL, resolved_source, source_label
from slimformer.fileio import atomic_write, read_json, write_json
from slimformer.search.baselines import uniform_baselines
from slimformer.search.config import SearchConfig
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import evaluate_plan, latency_ms, trial_plan
from slimformer.search.pause import pause_at
from slimformer.search.records import TrialRecord, is_feasible, is_recovered
from slimformer.search.recover_stage import in_search_record, recover_front, recovered_model, recovery_summary
from slimformer.search.report import LatencyNote, ReportInputs, report_units, write_report
from slimformer.search.report_bench import read_front_bench
from slimformer.search.report_plot import CloudPoint, PlotInputs, write_pareto_png
from slimformer.search.results import (
    BaselineResult,
    BestBaseline,
    BestRecipe,
    LatencyBudget,
    ParetoEntry,
    ParetoFront,
    RecipeProvenance,
    RecoverySummary,
    SearchSummary,
    pareto_trials,
)

IDENTITY_KEYS = ("model", "space", "budget", "objectives", "quality_metric", "data")


def check_or_write_config(run_dir: Path, config: SearchConfig) -> None:
    """A run dir belongs to one search: refuse to resume it with a different model/space/budget."""
    f = run_dir / "config.yaml"
    new = config.model_dump(mode="json")
    if f.exists():
        old = yaml.safe_load(f.read_text()) or {}
        changed = [k for k in IDENTITY_KEYS
                   if _unset_dropped(_identity(old, k)) != _unset_dropped(_identity(new, k))]
        if changed:
            raise ConfigError(f"{run_dir} holds a search with a different {', '.join(changed)}; "
                              "use another --run-dir to start a new search")
    atomic_write(f, config.to_yaml())


def _unset_dropped(v: Any) -> Any:
    """A config section without its unset (None) keys: a run written before an optional key existed (e.g.
    budget.latency) still resumes."""
    return {k: x for k, x in v.items() if x is not None} if isinstance(v, dict) else v


def resolved_latency_budget(ctx: SearchContext) -> LatencyBudget | None:
    """The search's resolved latency budget for pareto.json and summary.json (None without budget.latency)."""
    if ctx.latency_budget_ms is None or ctx.config.budget.latency is None:
        return None
    cfg = ctx.config.latency
    return LatencyBudget(round(ctx.latency_budget_ms, 6), ctx.config.budget.latency,
                         None if ctx.fp32_latency_ms is None else round(ctx.fp32_latency_ms, 6), cfg.batch, cfg.seq,
                         resolved_source(cfg.source, ctx.profile))


def _identity(cfg: dict[str, Any], key: str) -> Any:
    """A config section as resume compares it: `space.structure` counts only when the space prunes heads or
    neurons, and a config written before the field existed pruned by weight norms without re-fit."""
    v = cfg.get(key)
    if key == "space" and isinstance(v, dict):
        v = {**v}
        v.setdefault("structure", {"importance": "weight", "refit": False})
        if not any(g.get("heads_kept") or g.get("neurons_kept") for g in v.get("groups") or []):
            v.pop("structure")
    return v


def plan_summary(plan: CompressionPlan) -> dict[str, Any]:
    """A JSON-able plan: unit specs, layer specs and sharing."""
    return {
        "units": {k: {f: v for f, v in asdict(s).items()
                      if (v not in (None, 0.0, "unstructured") or f == "bits") and (f, v) != ("kernel", "exact")
                      and f != "tiers"} | ({} if s.tiers is None else {"tiers": layout_text(s.tiers.tiers)})
                  for k, s in plan.units.items()},
        "layers": {str(i): asdict(s) for i, s in plan.layers.items()},
        "sharing": {"groups": [list(g) for g in plan.sharing.groups], "scope": plan.sharing.scope}
        if plan.sharing.groups else None,
    }


def run_baselines(ctx: SearchContext, run_dir: Path, log: Any) -> list[BaselineResult]:
    """Evaluate (or reload) the uniform baselines that fit the budgets; with budget.latency, a baseline's latency
    is priced first and one over it is marked (`fits` false, `over_budget`), not evaluated."""
    f = run_dir / "baselines.json"
    cached = {b["name"]: b for b in read_json(f, [])}
    groups = sorted({g for grp in ctx.config.space.groups for g in grp.group_size if g is not None})
    results = []
    for b in uniform_baselines(ctx.adapter, ctx.budget_bytes, groups or [32], gptq=ctx.hessians is not None):
        if b.name in cached:
            results.append(BaselineResult(**cached[b.name]))
            continue
        r = BaselineResult(b.name, b.memory_bytes, round(100 * b.memory_bytes / ctx.fp32_bytes, 4), b.fits)
        if ctx.latency_budget_ms is not None:
            r.latency_ms = latency_ms(ctx, b.plan)
            over = ctx.over_budget(b.memory_bytes, r.latency_ms)
            r.fits, r.over_budget = not over, "+".join(over) or None
        elif not b.fits:
            r.over_budget = "memory"
        if r.fits:
            log(f"baseline {b.name} ({r.memory_percent:.2f}% of fp32)")
            try:
                ev = evaluate_plan(ctx, b.plan)
                r.latency_ms = ev.latency_ms
                r.search_metrics = ev.metrics
                r.heldout_metrics = evaluate_plan(ctx, b.plan, heldout=True).metrics
            except (RuntimeError, FloatingPointError, ValueError, MemoryError) as exc:  # a baseline, not the run
                r.error = f"{exc.__class__.__name__}: {str(exc)[:300]}"
                log(f"baseline {b.name} failed: {r.error}")
        results.append(r)
        write_json(f, [asdict(x) for x in results])
        pause_at("baselines", lambda fits=r.fits: fits)
    write_json(f, [asdict(x) for x in results])
    return results


def heldout_for_pareto(ctx: SearchContext, run_dir: Path, front: list[optuna.trial.FrozenTrial],
                       log: Any = None, recovered_models: dict[int, Any] | None = None) -> dict[int, dict[str, float]]:
    """Held-out metrics of the Pareto trials (cached in heldout.json); a trial recover_in_search added is scored
    as its recovered model (kept from the stage, or distilled again)."""
    f = run_dir / "heldout.json"
    cache = {int(k): v for k, v in read_json(f, {}).items()}
    todo = [t for t in front if t.number not in cache]
    for i, t in enumerate(todo):
        if log:
            log(f"held-out scoring of Pareto trial {t.number} ({i + 1}/{len(todo)})")
        if is_recovered(t):
            cache[t.number] = ctx.heldout_eval.evaluate(recovered_model(ctx, t, run_dir, recovered_models)).metrics
        else:
            cache[t.number] = evaluate_plan(ctx, trial_plan(ctx, t), heldout=True).metrics
        write_json(f, {str(k): v for k, v in sorted(cache.items())})
    return cache


def sample_fingerprint(sample: Any) -> str:
    """12 hex digits of SHA-256 over a text's UTF-8 bytes or an array's raw bytes."""
    raw = sample.encode() if isinstance(sample, str) else np.ascontiguousarray(sample).tobytes()
    return hashlib.sha256(raw).hexdigest()[:12]


def write_splits(ctx: SearchContext, run_dir: Path) -> None:
    """splits.json: which samples calibrated, scored and judged this search, and whether the sets are disjoint."""
    drawn = ctx.sets.drawn
    if drawn is None:
        return
    d = ctx.config.data
    prints = {name: [sample_fingerprint(x) for x in getattr(drawn, name).inputs]
              for name in ("calibration", "search", "heldout")}
    sets = [set(fps) for fps in prints.values()]
    disjoint = not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])  # text sources are de-duplicated
    write_json(run_dir / "splits.json", {
        "source": d.source, "seed": d.seed, "disjoint": disjoint,
        "sizes": {name: len(fps) for name, fps in prints.items()},
        "fingerprint": "sha256[:12] of each sample (text UTF-8 / image bytes)", "samples": prints})


def write_outputs(ctx: SearchContext, run_dir: Path, study: optuna.Study, baselines: list[BaselineResult],
                  study_name: str, storage: str, elapsed_s: float, log: Any = None,
                  recovered_models: dict[int, Any] | None = None) -> SearchSummary:
    """Pareto front, recipes, summary and report, from the study as it stands (recovering the top-k plans
    first when the config has `recover`; `recovered_models`: the models recover_in_search just made)."""
    write_splits(ctx, run_dir)
    front = pareto_trials(study, ctx.config.objectives)
    heldout = heldout_for_pareto(ctx, run_dir, front, log, recovered_models)
    recovered = recover_front(ctx, run_dir, front, log)
    records = dict(recovered)  # + the trials recover_in_search added: their recipes carry their distillation
    for t in front:
        if t.number not in records and (r := in_search_record(ctx, t, heldout)) is not None:
            records[t.number] = r
    m = ctx.quality_metric
    entries = []
    recipes_dir = run_dir / "recipes"
    recipes_dir.mkdir(exist_ok=True)
    current = {f"trial-{t.number}.yaml" for t in front}
    for stale in recipes_dir.glob("trial-*.yaml"):  # trials that have left the front
        if stale.name not in current:
            stale.unlink()
    for t in front:
        plan = trial_plan(ctx, t)
        entry = ParetoEntry.from_trial(t, plan_summary(plan), heldout[t.number], records.get(t.number))
        entries.append(entry)
        provenance = RecipeProvenance.of_trial(study_name, storage, t, heldout=entry.heldout_metrics,
                                               budget_bytes=ctx.budget_bytes, deploy=ctx.config.deploy)
        recipe = Recipe.from_plan(plan, ctx.adapter, hardware_profile=ctx.profile.name,
                                  hardware_profile_version=ctx.profile.version, provenance=provenance.to_json()
                                  ).model_copy(update={"recovery": records.get(t.number)})
        recipe.save(run_dir / entry.recipe)
    write_json(run_dir / "pareto.json", ParetoFront(ctx.config.objectives, m, ctx.budget_bytes, ctx.fp32_bytes,
                                                    entries, resolved_latency_budget(ctx)).to_json())
    pause_at("outputs")
    summary = summarize(ctx, study, entries, baselines, elapsed_s, recovery=recovery_summary(recovered, m))
    write_json(run_dir / "summary.json", summary.to_json())
    write_report_files(ctx, run_dir, study, entries, baselines, summary)
    return summary


def latency_note(ctx: SearchContext, source: str, label: str) -> LatencyNote:
    """What priced the latency numbers and where: the profile's machine against this one."""
    from slimformer.hardware_profiles.machine import cpu_info, mismatch

    lat, prof = ctx.config.latency, ctx.profile
    threads = lat.threads or (ctx.config.threads if source == "measured" else prof.threads) or 1
    return LatencyNote(source, label, prof.name, prof.version, prof.cpu, prof.threads,
                       f"{prof.runtime} {prof.runtime_version}", cpu_info()[0], mismatch(prof, lat.threads),
                       lat.batch, lat.seq, threads, lat.kernels)


def write_report_files(ctx: SearchContext, run_dir: Path, study: optuna.Study, entries: list[ParetoEntry],
                       baselines: list[BaselineResult], summary: SearchSummary) -> None:
    """pareto.png and report.html (with bench.json's measured latencies when `report --bench` wrote it)."""
    m = ctx.quality_metric
    qi = ctx.config.objectives.index("quality")
    cloud = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.from_trial(t)
        if is_feasible(t) and rec.memory_percent is not None and rec.latency_ms is not None:
            cloud.append(CloudPoint(rec.memory_percent, rec.latency_ms, t.values[qi]))
    note = latency_note(ctx, summary.latency_source, summary.latency_label)
    kind = {"calibrated": "calibrated prediction", "estimate": "roofline estimate"}.get(note.source, note.source)
    measured = read_front_bench(run_dir)
    write_pareto_png(run_dir / "pareto.png", PlotInputs(
        f"{ctx.config.model}: {len(entries)} Pareto plans, {len(cloud)} evaluated trials", m,
        100 * ctx.budget_bytes / ctx.fp32_bytes,
        f"{kind}, batch {note.batch} x seq {note.seq}, {note.threads} thread(s)", cloud, entries, baselines,
        measured, None if summary.latency_budget is None else summary.latency_budget.ms))
    write_report(run_dir / "report.html", ReportInputs(
        str(run_dir), ctx.config.model, m, list(ctx.heldout_eval.metric_names), list(ctx.config.objectives),
        ctx.budget_bytes, ctx.fp32_bytes, entries, baselines, summary, report_units(ctx.adapter.units),
        [info.index for info in ctx.adapter.layers], note, measured))


def summarize(ctx: SearchContext, study: optuna.Study, entries: list[ParetoEntry], baselines: list[BaselineResult],
              elapsed_s: float, recovery: RecoverySummary | None = None) -> SearchSummary:
    m = ctx.quality_metric
    states: dict[str, int] = {}
    done = [t for t in study.get_trials(deepcopy=False)]
    for t in done:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    records = [TrialRecord.from_trial(t) for t in done]
    timed = [(r.trial_s, r.eval_s) for r in records if r.trial_s is not None and r.eval_s is not None]
    best = max(entries, key=lambda e: e.heldout_metrics[m], default=None)
    fitting = [BestBaseline(b.name, b.memory_percent, b.heldout_metrics[m], b.heldout_metrics)
               for b in baselines if b.fits and b.heldout_metrics]
    best_base = max(fitting, key=lambda b: b.heldout_quality, default=None)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return SearchSummary(
        model=ctx.config.model,
        quality_metric=m,
        budget_bytes=ctx.budget_bytes,
        budget_percent=round(100 * ctx.budget_bytes / ctx.fp32_bytes, 3),
        fp32_bytes=ctx.fp32_bytes,
        trial_states=states,
        infeasible_trials=sum(1 for r in records if r.feasible is False),
        evaluated_trials=sum(1 for r in records if r.evaluated),
        pruned_trials=states.get("PRUNED", 0) - sum(1 for r in records if r.duplicate_of is not None),
        mean_pruned_trial_s=mean([r.pruned_s for r in records if r.pruned_s is not None]),
        elapsed_s=round(elapsed_s, 1),
        mean_trial_s=mean([trial_s for trial_s, _ in timed]),
        mean_eval_s=mean([eval_s for _, eval_s in timed]),
        mean_outside_forward_s=mean([trial_s - eval_s for trial_s, eval_s in timed]),
        best_recipe=None if best is None else BestRecipe(best.trial, best.recipe, best.memory_percent,
                                                         best.heldout_metrics[m], best.heldout_metrics),
        best_baseline=best_base,
        latency_label=(f"{MEASURED_LABEL}; batch {ctx.config.latency.batch} x seq {ctx.config.latency.seq}, "
                       f"{ctx.config.latency.kernels or 'per-unit'} kernels"
                       if ctx.config.latency.source == "measured"
                       else source_label(ctx.config.latency.source, ctx.profile)),
        latency_source=resolved_source(ctx.config.latency.source, ctx.profile),
        hardware_profile=ctx.profile.name,
        hardware_profile_version=ctx.profile.version,
        recovery=recovery,
        duplicate_trials=sum(1 for r in records if r.duplicate_of is not None),
        latency_budget=resolved_latency_budget(ctx),
    )
