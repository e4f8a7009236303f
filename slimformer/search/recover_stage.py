"""The search's optional recovery stage (`recover:` in the config): after the trials, the top-k Pareto plans
(ranked by search-set quality, never by held-out data) are compressed, distilled from the teacher on data
disjoint from the held-out set, and re-scored on the held-out set. Results are cached in recovered.json
(keyed by the plan's parameters and the recovery settings), so `slimformer report` does not re-train.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from slimformer import data as data_mod
from slimformer.fileio import read_json, write_json
from slimformer.models.base import Batch
from slimformer.recovery import RecoveryRecord, recover
from slimformer.recovery.data import IMAGE_SOURCES, training_batches
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import trial_plan
from slimformer.search.records import TrialRecord
from slimformer.search.results import RecoveredTrial, RecoverySummary
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
