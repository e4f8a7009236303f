"""Multi-fidelity evaluation: score a plan on a slice of the search data first, stop it early when clearly dominated.

Optuna's pruners are single-objective (they compare intermediate values of one objective), so the rule is ours:

  1. The plan is compressed and scored on the first `slice` of the search batches: slice quality q_s.
  2. From the study's fully scored feasible trials (each also records its slice quality) take the differences
     d = full - slice; predict the plan's full quality optimistically as
        upper = q_s + max(mean(d) + margin * sd(d), max(d)).
  3. If some fully scored feasible trial has no more memory and no more latency (the other objectives) and a
     full quality above `upper`, the plan would be dominated even in that optimistic case: it is PRUNED, with
     the reason, its slice quality and the dominating trial recorded. Nothing is pruned before
     `min_observations` full scorings (the noise estimate needs them).
  4. Otherwise the remaining batches are scored (the slice's outputs are reused) and the trial completes.

Everything the rule reads lives in the study storage, so it works the same across Ray workers, cooperating
drivers and resumed runs. PRUNED trials count toward `trials` (they were evaluated, partly), are never
feasible Pareto points, and are listed in the summary.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import optuna
import torch

from slimformer.compression.plan import CompressionPlan
from slimformer.search.context import SearchContext
from slimformer.search.evaluate import Evaluation
from slimformer.search.records import TrialRecord, is_feasible


@dataclass(frozen=True)
class SliceNoise:
    """Observed full - slice quality differences: how much the slice under- (or over-) states a plan."""

    n: int
    mean: float
    sd: float
    max: float

    def allowance(self, margin: float) -> float:
        """What is added to a slice quality for the optimistic full-data prediction."""
        return max(self.mean + margin * self.sd, self.max)


def slice_batches(ctx: SearchContext) -> int:
    """How many leading search batches the slice holds (at least one)."""
    n = len(ctx.search_eval.batches)
    return min(n, max(1, math.ceil(ctx.config.multi_fidelity.slice * n - 1e-9)))


def slice_noise(trials: list[optuna.trial.FrozenTrial], quality_index: int) -> SliceNoise | None:
    """The noise model from fully scored feasible trials that recorded their slice quality."""
    diffs = [t.values[quality_index] - float(q) for t in trials
             if is_feasible(t) and (q := TrialRecord.from_trial(t).slice_quality) is not None]
    if len(diffs) < 2:
        return None
    return SliceNoise(len(diffs), statistics.fmean(diffs), statistics.stdev(diffs), max(diffs))


def dominating_trial(trials: list[optuna.trial.FrozenTrial], objectives: list[str], values: dict[str, float],
                     above: float) -> optuna.trial.FrozenTrial | None:
    """A fully scored feasible trial with no more of each non-quality objective than `values` and a quality
    above `above` (the best such one), else None."""
    qi = objectives.index("quality")
    best = None
    for t in trials:
        if not is_feasible(t) or t.values[qi] <= above:
            continue
        if all(t.values[i] <= values[o] for i, o in enumerate(objectives) if o != "quality"):
            if best is None or t.values[qi] > best.values[qi]:
                best = t
    return best


def evaluate_or_prune(ctx: SearchContext, plan: CompressionPlan, trial: optuna.Trial, latency_ms: float,
                      memory_bytes: int) -> Evaluation:
    """Evaluate `plan` for `trial` with the slice-first rule; raises optuna.TrialPruned when dominated."""
    values = {"latency": latency_ms, "memory": float(memory_bytes)}
    mf = ctx.config.multi_fidelity
    objectives = ctx.config.objectives
    ev = ctx.search_eval
    k = slice_batches(ctx)
    t0 = time.perf_counter()
    model = ctx.compress(plan)
    t1 = time.perf_counter()
    head = ev.outputs(model, 0, k)
    q_slice = ev.score(head).value(ctx.quality_metric)
    TrialRecord(slice_quality=q_slice).write(trial)
    if k < len(ev.batches) and math.isfinite(q_slice):
        trials = trial.study.get_trials(deepcopy=False)
        noise = slice_noise(trials, objectives.index("quality"))
        if noise is not None and noise.n >= mf.min_observations:
            upper = q_slice + noise.allowance(mf.margin)
            winner = dominating_trial(trials, objectives, values, upper)
            if winner is not None:
                full_q = winner.values[objectives.index("quality")]
                TrialRecord(feasible=True, eval_s=time.perf_counter() - t1, apply_s=t1 - t0,
                            pruned_s=time.perf_counter() - t0,
                            pruned_reason=f"slice {ctx.quality_metric} {q_slice:.4f} + {upper - q_slice:.4f}"
                            f" (noise of {noise.n} plans) < {full_q:.4f} of trial {winner.number}, which "
                            "needs no more memory or latency").write(trial)
                raise optuna.TrialPruned(f"dominated by trial {winner.number}")
    rest = ev.outputs(model, k, None) if k < len(ev.batches) else head[:0]
    result = ev.score(torch.cat([head, rest]))
    t2 = time.perf_counter()
    return Evaluation(result.metrics, result.value(ctx.quality_metric), latency_ms, memory_bytes, t1 - t0, t2 - t1)
