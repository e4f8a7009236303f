"""The search's two optional recovery stages.

`recover_in_search:` (recover_in_search): after the trials, the most promising structural plans (pruned heads
or neurons, low rank, sparsity, sharing: plans that lose quality a short distillation can bring back) are
distilled for a few steps on training data disjoint from the search and held-out sets, scored on the search set
and added to the study as new trials (TrialRecord.recovered_from) carrying the recovered score. The Pareto front,
the recipes and the summary then rank them by that score, next to the quantisation-only plans; their recipes
record the recovery settings (`apply --recover` reproduces the model). Held-out data is never used to choose or
rank: it is scored only for the report, afterwards (heldout_for_pareto).

`recover:` (recover_front): after that, the top-k Pareto plans (ranked by search-set quality, never by held-out
data) are compressed, distilled from the teacher on data disjoint from the held-out set, and re-scored on the
held-out set. Results are cached in recovered.json (keyed by the plan's parameters and the recovery settings), so
`slimformer report` does not re-train.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from torch import nn

from slimformer import data as data_mod
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, save_compressed
from slimformer.fileio import read_json, write_json
from slimformer.models.base import Batch
from slimformer.recovery import RecoveryRecord, recover
from slimformer.recovery.config import RecoveryConfig, SearchRecoveryConfig
from slimformer.recovery.data import IMAGE_SOURCES, training_batches
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import trial_plan
from slimformer.search.records import TrialRecord, is_feasible, is_recovered
from slimformer.search.results import DIRECTIONS, RecoveredTrial, RecoverySummary
from slimformer.threads import using_threads

RECOVERED_FILE = "recovered.json"


def heldout_texts(ctx: SearchContext) -> list[str]:
    """The held-out texts of this search (as `load_eval_sets` draws them); empty for images."""
    d = ctx.config.data
    if d.source in IMAGE_SOURCES:
        return []
    return data_mod.text_sets(d.source, 0, 0, d.heldout_samples, d.seed).heldout  # depends on n_heldout only


def train_batches(ctx: SearchContext) -> list[Batch]:
    cfg = ctx.config.recover
    assert cfg is not None
    source = ctx.adapter.recovery_source(cfg.data, ctx.config.data.source)
    return training_batches(ctx.adapter, source, cfg.batch_size, heldout_texts(ctx), cfg.samples, cfg.seed)


def _key(trial: optuna.trial.FrozenTrial, settings: dict[str, Any]) -> str:
    raw = json.dumps({"params": trial.params, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def recover_front(ctx: SearchContext, run_dir: Any, front: list[optuna.trial.FrozenTrial],
                  log: Any = None) -> dict[int, RecoveryRecord]:
    """Recover the top-k trials of `front`; {trial number: record} (empty when the config has no `recover`)."""
    cfg = ctx.config.recover
    if cfg is None or not front:
        return {}
    say = log or (lambda _msg: None)
    m = ctx.quality_metric
    settings = cfg.model_dump(mode="json", exclude_none=True)

    def search_quality(t: optuna.trial.FrozenTrial) -> float:
        return (TrialRecord.from_trial(t).metrics or {}).get(m, float("-inf"))

    chosen = sorted(front, key=lambda t: -search_quality(t))[: cfg.top_k]
    f = run_dir / RECOVERED_FILE
    cache: dict[str, Any] = read_json(f, {})
    out: dict[int, RecoveryRecord] = {}
    batches: list[Batch] | None = None
    for i, t in enumerate(chosen):
        key = _key(t, settings)
        hit = cache.get(str(t.number))
        if hit is not None and hit.get("key") == key:
            out[t.number] = RecoveryRecord.model_validate(hit["record"])
            continue
        if batches is None:
            batches = train_batches(ctx)
        say(f"recovering trial {t.number} ({i + 1}/{len(chosen)})")
        model = ctx.compress(trial_plan(ctx, t))
        with using_threads():
            res = recover(ctx.adapter, model, batches, cfg, evaluator=ctx.heldout_eval, log=say)
        out[t.number] = res.record()
        cache[str(t.number)] = {"key": key, "record": out[t.number].model_dump(mode="json")}
        write_json(f, cache)
    return out


def recovery_summary(records: dict[int, RecoveryRecord], metric: str) -> RecoverySummary | None:
    """Before/after held-out quality per recovered trial and the best trial after recovery."""
    if not records:
        return None
    rows = [RecoveredTrial(n, r.before.get(metric), r.after.get(metric), r.steps, r.seconds)
            for n, r in sorted(records.items())]
    best = max(rows, key=lambda r: r.after if r.after is not None else float("-inf"))
    return RecoverySummary(rows, best.trial, best.after, next(iter(records.values())).settings)


# -- recover_in_search --------------------------------------------------------------------------------------


def is_structural(plan: CompressionPlan) -> bool:
    """The plan changes more than numerics (heads, neurons, rank, sparsity or sharing): a plan whose quality a
    short distillation can bring back, unlike a quantisation-only one."""
    return (any(s.heads_kept is not None or s.neurons_kept is not None for s in plan.layers.values())
            or any(u.rank is not None or u.sparsity > 0 for u in plan.units.values()) or bool(plan.sharing.groups))


def excluded_texts(ctx: SearchContext) -> list[str]:
    """What in-search recovery must never train on: the search set (its recovered scores must stay comparable
    with the other trials' scores) and the held-out set (empty for images, whose sets are separate splits)."""
    d = ctx.config.data
    drawn = ctx.adapter.eval_samples(d.source, d.search_samples, d.heldout_samples, d.calibration_samples, d.seed)
    return [x for x in [*drawn.search.inputs, *drawn.heldout.inputs] if isinstance(x, str)]


def in_search_batches(ctx: SearchContext, cfg: SearchRecoveryConfig) -> tuple[str, list[Batch]]:
    """(resolved training source, batches) for in-search recovery: disjoint from the search and held-out sets."""
    source = ctx.adapter.recovery_source(cfg.data, ctx.config.data.source)
    return source, training_batches(ctx.adapter, source, cfg.batch_size, excluded_texts(ctx), cfg.samples, cfg.seed)


def _costs(ctx: SearchContext, t: FrozenTrial) -> tuple[float, ...]:
    """The trial's cost objectives (latency, memory, as configured), lower is better."""
    return tuple(v for o, v in zip(ctx.config.objectives, t.values) if o != "quality")


def promising(ctx: SearchContext, trials: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    """Up to `k` structural trials to recover: the Pareto front of the structural plans alone (their unrecovered
    quality against cost), spread evenly along the first cost objective so that fast and small plans get their
    chance as well as the best-scoring ones (a single chosen plan: the best-scoring one)."""
    qi = ctx.config.objectives.index("quality")
    signs = [1.0 if DIRECTIONS[o] == "maximize" else -1.0 for o in ctx.config.objectives]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        va, vb = [s * v for s, v in zip(signs, a.values)], [s * v for s, v in zip(signs, b.values)]
        return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))

    front = [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]
    if len(front) <= k:
        return sorted(front, key=lambda t: -t.values[qi])
    if k == 1:
        return [max(front, key=lambda t: t.values[qi])]
    ordered = sorted(front, key=lambda t: (_costs(ctx, t), -t.values[qi]))
    picks = sorted({round(i * (len(ordered) - 1) / (k - 1)) for i in range(k)})
    return [ordered[i] for i in picks]


def recovery_key(t: FrozenTrial, settings: dict[str, Any]) -> str:
    """Digest of a plan's params and the recovery settings: a resumed search recovers a plan only once."""
    return _key(t, settings)


RECOVERED_DIR = "recovered"  # run_dir/recovered/trial-N: the compressed model directory of recovered trial N


def recover_in_search(ctx: SearchContext, study: optuna.Study, log: Any = None,
                      run_dir: Path | None = None) -> dict[int, nn.Module]:
    """Distil the most promising structural plans and add each, scored on the search set, as a new trial;
    {new trial number: recovered model} (for held-out scoring afterwards; empty without `recover_in_search`).
    With `run_dir`, each recovered model is also saved as run_dir/recovered/trial-N (a compressed model
    directory: `slimformer export` / `bench` take it as it is).

    Never reads held-out data: training excludes the search and held-out texts, scoring uses the search set."""
    cfg = ctx.config.recover_in_search
    if cfg is None:
        return {}
    say = log or (lambda _msg: None)
    trials = study.get_trials(deepcopy=False)
    done = {TrialRecord.from_trial(t).recovery_key for t in trials if is_recovered(t)}
    cands = [t for t in trials if is_feasible(t) and not is_recovered(t) and is_structural(trial_plan(ctx, t))]
    settings = recovered_settings(ctx) or {}
    batches: list[Batch] = []
    out: dict[int, nn.Module] = {}
    chosen = promising(ctx, cands, cfg.top_k)
    for i, t in enumerate(chosen):
        key = recovery_key(t, settings)
        if key in done:
            continue
        if not batches:
            batches = in_search_batches(ctx, cfg)[1]
        say(f"recovery in the search: trial {t.number} ({i + 1}/{len(chosen)}), {cfg.step_budget or cfg.minutes} "
            f"{'steps' if cfg.step_budget else 'min'}")
        model = ctx.compress(trial_plan(ctx, t))
        try:
            with using_threads():
                res = recover(ctx.adapter, model, batches, _config_of(settings), log=say)
        except (RuntimeError, FloatingPointError, ValueError, MemoryError) as exc:  # one plan, not the search
            say(f"recovery of trial {t.number} failed ({exc.__class__.__name__}: {str(exc)[:200]}); not added")
            continue
        ev = ctx.search_eval.evaluate(model)
        if not all(v == v for v in ev.metrics.values()):  # NaN: not a plan to offer
            say(f"recovery of trial {t.number} gave non-finite metrics; not added")
            continue
        src = TrialRecord.from_trial(t)
        values = [ev.value(ctx.quality_metric) if o == "quality" else v
                  for o, v in zip(ctx.config.objectives, t.values)]
        rec = TrialRecord(memory_bytes=src.memory_bytes, memory_percent=src.memory_percent, latency_ms=src.latency_ms,
                          latency_source=src.latency_source, latency_iqr_ms=src.latency_iqr_ms, feasible=True,
                          metrics=ev.metrics, recovered_from=t.number, recovery_key=key, recovery_steps=res.steps,
                          recovery_s=round(res.seconds, 1),
                          recovery_samples=res.train_samples, unrecovered_metrics=src.metrics)
        new = optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=values,
                                        user_attrs=rec.to_user_attrs(), constraints=t.constraints or None)
        study.add_trial(new)
        number = max(x.number for x in study.get_trials(deepcopy=False))
        q0 = (src.metrics or {}).get(ctx.quality_metric)
        say(f"trial {t.number} recovered as trial {number}: search {ctx.quality_metric} "
            f"{q0 if q0 is None else round(q0, 4)} -> {ev.value(ctx.quality_metric):.4f}")
        out[number] = model
        if run_dir is not None:
            recipe = Recipe.from_plan(trial_plan(ctx, t), ctx.adapter).model_copy(update={"recovery": RecoveryRecord(
                settings=settings, steps=res.steps, seconds=round(res.seconds, 1), train_samples=res.train_samples,
                eval_samples=0, before={}, after={})})
            save_compressed(ctx.adapter, model, recipe, run_dir / RECOVERED_DIR / f"trial-{number}")
    return out


def recovered_model(ctx: SearchContext, t: FrozenTrial, run_dir: Path | None = None,
                    models: dict[int, nn.Module] | None = None) -> nn.Module:
    """A recovered trial's model: kept from the stage, else saved in run_dir/recovered, else distilled again."""
    if models and t.number in models:
        return models[t.number]
    saved = None if run_dir is None else run_dir / RECOVERED_DIR / f"trial-{t.number}"
    if saved is not None and saved.is_dir():
        return load_compressed(saved).model
    return rebuild_recovered(ctx, t)


def _config_of(settings: dict[str, Any]) -> RecoveryConfig:
    """The RecoveryConfig a recorded settings dict describes."""
    return RecoveryConfig.model_validate(settings)


def recovered_settings(ctx: SearchContext) -> dict[str, Any] | None:
    """The settings recover_in_search records (training source resolved), or None without the key."""
    cfg = ctx.config.recover_in_search
    if cfg is None:
        return None
    return {**cfg.settings(), "data": ctx.adapter.recovery_source(cfg.data, ctx.config.data.source)}


def rebuild_recovered(ctx: SearchContext, t: FrozenTrial) -> nn.Module:
    """A recovered trial's model again (same plan, same step budget, same seed and data: the same weights up to
    thread-order rounding), for held-out scoring when the search that made it is not this process."""
    cfg = ctx.config.recover_in_search or SearchRecoveryConfig()
    _, batches = in_search_batches(ctx, cfg)
    model = ctx.compress(trial_plan(ctx, t))
    with using_threads():
        recover(ctx.adapter, model, batches, _config_of(recovered_settings(ctx) or cfg.settings()))
    return model


def in_search_record(ctx: SearchContext, t: FrozenTrial, heldout: dict[int, dict[str, float]]) -> RecoveryRecord | None:
    """What a recovered trial's recipe records: the settings `apply --recover` reproduces it with and held-out
    quality before (its source trial's, when scored) and after; None for any other trial."""
    rec = TrialRecord.from_trial(t)
    settings = recovered_settings(ctx)
    if rec.recovered_from is None or settings is None:
        return None
    after = heldout.get(t.number, {})
    n_eval = int(ctx.heldout_eval.teacher_out.shape[0])
    return RecoveryRecord(settings=settings, steps=rec.recovery_steps or 0, seconds=rec.recovery_s or 0.0,
                          train_samples=rec.recovery_samples or 0, eval_samples=n_eval,
                          before=heldout.get(rec.recovered_from, {}), after=after)
