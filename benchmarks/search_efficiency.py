"""Benchmark: how good a front each sampler finds in 50 and 100 evaluated trials (hypervolume), Quickstart search.

    nice -n 10 python benchmarks/search_efficiency.py [--trials 100] [--seeds 0 1 2] [--arms default tpe random]
    nice -n 10 python benchmarks/search_efficiency.py --space speed   # the rich MiniLM space (issue 13)

--space quickstart (default): the Quickstart's bits-only space, latency priced by the roofline estimate.
--space speed: MiniLM with heads, FFN neurons, low rank, bits, group size and compute kernel (exact | int8) per
layer, memory 15%, latency from the calibrated profile amd-epyc-avx512-1t-ort1-32 at 1 x 128 tokens (predicted,
deterministic: the benchmark is not timing-sensitive); writes search_efficiency_speed.json and its own section.

One Optuna study per (arm, seed) under --run-root (runs/bench-efficiency/ARM-sSEED/study.db); re-running skips
finished studies and tops up unfinished ones (resume), so the ~900 trials can be spread over several commands.
All runs share one prepared search (model, teacher outputs, calibration statistics, the unit cache and the
sensitivity measurement: deterministic work whose results do not depend on the sampler), which changes how long
the runs take, never what they find. Writes benchmarks/results/search_efficiency.json and the section between
`<!-- search_efficiency:begin -->` / `<!-- search_efficiency:end -->` in docs/BENCHMARKS.md.

Hypervolume (HV) of the feasible trials' front, each objective mapped to a goodness in [0, 1] (clipped):
  quality  (q - q_ref) / (1 - q_ref), q_ref = the worst search-set quality among the fitting uniform int4
           baselines (RTN and GPTQ, every group size; the plans any search must beat), 1 = the teacher;
  memory   (budget - bytes) / (budget - min_bytes), min_bytes = the smallest plan in the space;
  latency  (fp32 - ms) / (fp32 - min_ms), fp32 = the uncompressed model's estimate, min_ms = the estimate
           of the smallest plan (clipped at 1 if a plan is faster).
The reference point is the origin of that cube (q_ref, budget, fp32 latency); HV is the volume the front
dominates in it (1 = a plan as good as the teacher at the smallest size and latency). Objectives whose range is
under 1% of the reference are left out of HV (hv_axes: on MiniLM the latency estimate spans 0.03%).
Each run also reports the HV of its start points alone and the gain over them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "search_efficiency.json"
# the rich space of issue 13 (--space speed): every axis that changes compute, not only bytes
SPEED_CONFIG: dict[str, Any] = {
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "data": {"source": "fortunes", "search_samples": 128, "heldout_samples": 256, "calibration_samples": 64,
             "batch_size": 32, "max_length": 128},
    "space": {"per_layer": True, "sharing": ["none"], "groups": [
        {"select": {"role": ["embedding"]}, "bits": [4], "group_size": [32, 64, 128]},
        # "keep all" first in every structured axis: uniform start points fill unset dimensions with the first
        {"select": {"role": ["query", "key", "value", "attn_out"]}, "heads_kept": [12, 9, 6],
         "rank_fraction": [1.0, 0.375], "bits": [8, 4], "group_size": [None, 128], "method": ["gptq"],
         "kernel": ["exact", "int8"]},
        {"select": {"role": ["ffn_in", "ffn_out"]}, "neurons_kept": [1.0, 0.75, 0.5],
         "rank_fraction": [1.0, 0.5], "bits": [8, 4], "group_size": [None, 128], "method": ["gptq"],
         "kernel": ["exact", "int8"]},
    ]},
    "budget": {"memory": "15%"},
    "objectives": ["quality", "latency", "memory"],
    "sampler": {"name": "nsga2", "population_size": 16, "seed": 0},
    "hardware_profile": "amd-epyc-avx512-1t-ort1-32",
    "latency": {"source": "calibrated", "batch": 1, "seq": 128},
    "deploy": "onnx",
}
STUDY = "efficiency"
OVER_BUDGET_CAP = 3  # over-budget samples per requested trial before a run stops (the runner's own cap is 20)
# arm -> config updates over the Quickstart config; every arm but random-bare gets the Quickstart start points
# (uniform in-space plans, sensitivity-greedy plans, random feasible plans: the same plans for one seed), so the
# arms differ only in how they sample after them. nsga2-repair is the Quickstart default (sampler.repair: true).
ARMS: dict[str, dict[str, Any]] = {
    "nsga2-repair": {"sampler": {"name": "nsga2", "repair": True}, "start_points": "sensitivity"},
    "nsga2": {"sampler": {"name": "nsga2", "repair": False}, "start_points": "sensitivity"},
    "tpe": {"sampler": {"name": "tpe", "repair": False}, "start_points": "sensitivity"},
    "random": {"sampler": {"name": "random", "repair": False}, "start_points": "sensitivity"},
    "random-repair": {"sampler": {"name": "random", "repair": True}, "start_points": "sensitivity"},
    "random-bare": {"sampler": {"name": "random", "repair": False}, "start_points": "none"},
    # random sampling made feasible and nothing else: no start points, so no sensitivity table, and repair
    # moves each over-budget sample down by the step that saves the most bytes
    "random-repair-bare": {"sampler": {"name": "random", "repair": True}, "start_points": "none"},
    "nsga2-repair-bare": {"sampler": {"name": "nsga2", "repair": True}, "start_points": "none"},  # the default
    # without its start points: what NSGA-II + repair find on their own
    "nsga2-repair-mf": {"sampler": {"name": "nsga2", "repair": True}, "start_points": "sensitivity",
                        "multi_fidelity": {"enabled": True}},
}


RANDOM_ARMS = ("random-repair-bare", "random", "random-repair")  # the baselines the summary divides by


def hypervolume(points: list[tuple[float, ...]]) -> float:
    """Exact volume dominated by `points` (goodness, maximised) above the origin, by slicing on the last axis."""
    pts = [p for p in points if all(x > 0 for x in p)]
    if not pts:
        return 0.0
    if len(pts[0]) == 1:
        return max(p[0] for p in pts)
    levels = sorted({p[-1] for p in pts}, reverse=True)
    total = 0.0
    for i, h in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else 0.0
        total += (h - below) * hypervolume([p[:-1] for p in pts if p[-1] >= h])
    return total


def counted_prefix(trials: list[Any], n: int) -> list[Any]:
    """The trials (by number) up to the one that makes the n-th counted trial (records.counted_trials)."""
    from slimformer.search.records import counted_trials

    out: list[Any] = []
    counted = 0
    for t in sorted(trials, key=lambda t: t.number):
        if counted >= n:
            break
        out.append(t)
        counted += counted_trials([t])
    return out


def normaliser(ctx: Any, baselines: list[Any], root: Path | None = None, speed: bool = False) -> dict[str, Any]:
    """The reference point and ideal of each objective (see the module docstring). `speed`: the quality reference
    is the search-set quality of the space's fastest plan (when lower than the int4 baselines'), cached in
    root/reference.json: in a space whose speed comes from structure and int8 kernels, the quality every faster
    plan pays lies below the int4 baselines, and a reference above it would score the whole trade-off as 0."""
    from slimformer.compression.plan import CompressionPlan
    from slimformer.search.context import fastest_params
    from slimformer.search.evaluate import evaluate_plan, latency_ms

    m = ctx.quality_metric
    int4 = [b.search_metrics[m] for b in baselines if b.fits and b.search_metrics and b.name.startswith("uniform-int4")]
    min_plan = ctx.space.min_memory_plan()
    fastest = ctx.space.plan_from_params(fastest_params(ctx.space, lambda p: latency_ms(ctx, p)))
    q_ref, q_from = min(int4), "worst fitting uniform int4 baseline (search set)"
    if speed:
        f = (root or Path(ctx.config.run_dir)) / "reference.json"
        cached = json.loads(f.read_text()) if f.exists() else {}
        if "fastest_quality" not in cached:
            cached["fastest_quality"] = evaluate_plan(ctx, fastest).quality
            f.write_text(json.dumps(cached) + "\n")
        if cached["fastest_quality"] < q_ref:
            q_ref, q_from = cached["fastest_quality"], "the space's fastest plan (search set)"
    return {"quality_ref": q_ref, "quality_ideal": 1.0,
            "memory_ref": ctx.budget_bytes, "memory_ideal": ctx.min_bytes,
            "latency_ref": latency_ms(ctx, CompressionPlan()),
            # the fastest plan of the space (the smallest plan in the Quickstart space, where bytes set latency)
            "latency_ideal": min(latency_ms(ctx, min_plan), latency_ms(ctx, fastest)),
            "quality_ref_from": q_from}


def goodness(values: dict[str, float], norm: dict[str, Any]) -> dict[str, float]:
    def clip(x: float) -> float:
        return min(1.0, max(0.0, x))

    out = {}
    for k, v in values.items():
        ref, ideal = norm[f"{k}_ref"], norm[f"{k}_ideal"]
        out[k] = clip((v - ref) / (ideal - ref))
    return out


def hv_axes(objectives: list[str], norm: dict[str, Any]) -> list[str]:
    """The objectives HV is measured on: those whose range from reference to ideal is at least 1% of the
    reference (the roofline latency estimate of MiniLM at batch 1 x 128 tokens moves by 0.03% across the whole
    Quickstart space, so a 5-microsecond difference would otherwise weigh as much as the whole quality range)."""
    return [o for o in objectives if abs(norm[f"{o}_ref"] - norm[f"{o}_ideal"]) >= 0.01 * abs(norm[f"{o}_ref"])]


def score(trials: list[Any], objectives: list[str], norm: dict[str, Any], n: int) -> dict[str, Any]:
    from slimformer.search.records import TrialRecord, counted_trials, is_feasible, is_infeasible

    pre = counted_prefix(trials, n)
    feas = [t for t in pre if is_feasible(t)]
    axes = hv_axes(objectives, norm)
    pts = [tuple(goodness(dict(zip(objectives, t.values)), norm)[o] for o in axes) for t in feas]
    front = [t for t, p in zip(feas, pts) if not any(
        all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for q in pts)]
    starts = [p for t, p in zip(feas, pts) if TrialRecord.from_trial(t).start_point is not None]
    return {"hv": round(hypervolume(pts), 6), "hv_start_points": round(hypervolume(starts), 6),
            "counted": counted_trials(pre), "feasible": len(feas),
            "over_budget": sum(1 for t in pre if is_infeasible(t)),
            "front": len(front),
            "front_start_points": sum(1 for t in front if TrialRecord.from_trial(t).start_point is not None),
            "front_plans": sorted({hashlib.sha1(repr(sorted(t.params.items())).encode()).hexdigest()[:10]
                                   for t in front}),
            "pruned": sum(1 for t in pre if t.state.name == "PRUNED"),
            "best_quality": max((t.values[objectives.index("quality")] for t in feas), default=None)}


def feasible_fraction(ctx: Any, n: int = 20000, seed: int = 0) -> float:
    """The share of unbiased random plans of the space (every choice equally likely) that fit the budget."""
    import random

    from slimformer.compression.memory import plan_memory

    rng = random.Random(seed)
    dists = ctx.space.distributions()
    fit = sum(plan_memory(ctx.adapter, ctx.space.plan_from_params(
        {k: rng.choice(d.choices) for k, d in dists.items()})).total_bytes <= ctx.budget_bytes for _ in range(n))
    return fit / n


def run_arm(ctx: Any, arm: str, seed: int, trials: int, root: Path, load_only: bool = False) -> list[Any]:
    """Run (or resume; with load_only just load) one (arm, seed) study; returns its trials."""
    from slimformer.search import runner
    from slimformer.search.config import SearchConfig
    from slimformer.search.records import counted_trials, infeasible_trials
    from slimformer.search.runner import run_trials
    from slimformer.search.storage import close_storage, make_storage

    base = ctx.config.model_dump()
    upd = ARMS[arm]
    cfg = SearchConfig.model_validate(base | upd | {"sampler": base["sampler"] | upd["sampler"] | {"seed": seed},
                                                    "trials": trials})
    run_dir = root / f"{arm}-s{seed}"
    storage, url, _ = make_storage(None, run_dir)
    try:
        import optuna

        try:
            done = counted_trials(optuna.load_study(study_name=STUDY, storage=storage))
        except KeyError:
            done = 0
        over = infeasible_trials(optuna.load_study(study_name=STUDY, storage=storage)) if done else 0
        if done < trials and over < OVER_BUDGET_CAP * trials and not load_only:
            runner.INFEASIBLE_CAP = OVER_BUDGET_CAP - over / trials  # a study-wide cap, also across resumes
            t0 = time.perf_counter()
            print(f"{arm} seed {seed}: {done} -> {trials} trials", flush=True)
            run_trials(replace(ctx, config=cfg), storage, STUDY, trials, None, progress=False, single_driver=True,
                       label=url)
            print(f"{arm} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    finally:
        from contextlib import suppress

        with suppress(Exception):
            close_storage(storage)


def load_trials(run_dir: Path) -> list[Any]:
    """The trials of one finished (or partial) study, read-only: --report-only without preparing the model."""
    import optuna

    from slimformer.search.storage import default_url

    return optuna.load_study(study_name=STUDY, storage=default_url(run_dir)).get_trials(deepcopy=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["nsga2-repair", "tpe", "random-repair-bare", "random"],
                    choices=list(ARMS))
    ap.add_argument("--space", choices=["quickstart", "speed"], default="quickstart",
                    help="quickstart: the bits-only Quickstart space; speed: the rich MiniLM space (SPEED_CONFIG)")
    ap.add_argument("--run-root", default=None, help="default runs/bench-efficiency[-speed]")
    ap.add_argument("--report-only", action="store_true", help="score the finished studies, run nothing")
    args = ap.parse_args()
    os.nice(10)

    import torch

    from slimformer.search import SearchConfig, prepare
    from slimformer.search import start as start_mod
    from slimformer.search.records import counted_trials, is_infeasible
    from slimformer.search.rundir import run_baselines

    speed = args.space == "speed"
    root = Path(args.run_root or ("runs/bench-efficiency-speed" if speed else "runs/bench-efficiency"))
    root.mkdir(parents=True, exist_ok=True)
    if speed:
        cfg = SearchConfig.model_validate(SPEED_CONFIG | {"threads": 1, "trials": args.trials, "run_dir": str(root)})
    else:
        cfg = SearchConfig.load(None)
        cfg = cfg.model_copy(update={"threads": 1, "baselines": True, "trials": args.trials, "run_dir": str(root),
                                     # the roofline estimate: what the stored studies were priced with (fixed, so
                                     # that a later calibrated profile does not change a resumed benchmark)
                                     "latency": cfg.latency.model_copy(update={"source": "estimate"})})
    t0 = time.perf_counter()
    prepared = root / "prepared.json"  # what scoring needs from the prepared search; --report-only reads it
    ctx = None
    if args.report_only and prepared.exists():
        facts = json.loads(prepared.read_text())
    else:
        ctx = prepare(cfg, log=print)
        baselines = run_baselines(ctx, root, print)  # cached in root/baselines.json
        facts = {"normalisation": normaliser(ctx, baselines, root, speed), "objectives": ctx.config.objectives,
                 "quality_metric": ctx.quality_metric, "random_plans_that_fit": feasible_fraction(ctx),
                 "budget_percent": round(100 * ctx.budget_bytes / ctx.fp32_bytes, 3)}
        prepared.write_text(json.dumps(facts, indent=2) + "\n")
    norm = facts["normalisation"]
    measured: dict[int, Any] = {}
    measure = start_mod.measure_sensitivity

    def shared_sensitivity(c: Any, batches: int = 1) -> Any:  # same model, data and budget in every run
        if batches not in measured:
            measured[batches] = measure(c, batches)
        return measured[batches]

    start_mod.measure_sensitivity = shared_sensitivity
    print(f"prepared in {time.perf_counter() - t0:.0f} s; reference {norm}", flush=True)

    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = root / f"{arm}-s{seed}"
            if args.report_only and not run_dir.exists():
                continue
            trials = load_trials(run_dir) if ctx is None else run_arm(ctx, arm, seed, args.trials, root,
                                                                      load_only=args.report_only)
            secs = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                       if t.datetime_complete and t.datetime_start)
            over = sum(1 for t in trials if is_infeasible(t))
            finished = counted_trials(trials) >= args.trials or over >= OVER_BUDGET_CAP * args.trials
            runs.append({"arm": arm, "seed": seed, "trial_seconds": round(secs, 1), "study_trials": len(trials),
                         "finished": finished,
                         **{str(n): score(trials, facts["objectives"], norm, n) for n in args.checkpoints}})
            print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs, args.checkpoints)
    result = {"command": "nice -n 10 python benchmarks/search_efficiency.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("report_only", "run_root", "space")) + (
        " --space speed" if speed else ""), "space": args.space,
        "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
        **facts, "hv_axes": hv_axes(facts["objectives"], norm), "over_budget_cap": OVER_BUDGET_CAP,
        "runs": runs, "summary": summary}
    out = RESULTS.with_name("search_efficiency_speed.json") if speed else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    update_docs(result, args.checkpoints, "search_efficiency_speed" if speed else "search_efficiency")
    print(json.dumps(summary, indent=2))
    return 0


def summarise(runs: list[dict[str, Any]], checkpoints: list[int]) -> dict[str, Any]:
    arms = sorted({r["arm"] for r in runs}, key=list(ARMS).index)
    out: dict[str, Any] = {}
    for arm in arms:  # means over finished runs (random runs finish at the over-budget cap)
        rs = [r for r in runs if r["arm"] == arm and r["finished"]]
        if not rs:
            continue
        out[arm] = {str(n): round(sum(r[str(n)]["hv"] for r in rs) / len(rs), 6) for n in checkpoints}
        out[arm]["seeds"] = [r["seed"] for r in rs]
        last = str(checkpoints[-1])
        starts = [r[last]["hv_start_points"] for r in rs if r[last].get("hv_start_points")]
        if len(starts) == len(rs):  # HV over that of the arm's own start points: an upper bound of the ratio to
            # RandomSampler given the same start points (whose HV is at least theirs)
            out[arm]["hv_start_points"] = round(sum(starts) / len(starts), 6)
            out[arm][f"over_start_points_{last}"] = round(out[arm][last] / out[arm]["hv_start_points"], 4)
    last = str(checkpoints[-1])
    for r in runs:  # multi-fidelity: the same arm and seed without it
        base = next((b for b in runs if b["arm"] + "-mf" == r["arm"] and b["seed"] == r["seed"]), None)
        if base is not None and r["finished"] and base["finished"] and r["arm"] in out:
            out.setdefault(r["arm"], {}).setdefault("vs_without", []).append({
                "seed": r["seed"], "time_ratio": round(r["trial_seconds"] / base["trial_seconds"], 3),
                "pruned": r[last]["pruned"], "hv": r[last]["hv"], "hv_without": base[last]["hv"],
                "same_front": r[last]["front_plans"] == base[last]["front_plans"],
                "front_plans_shared": len(set(r[last]["front_plans"]) & set(base[last]["front_plans"])),
                "front": len(r[last]["front_plans"]), "front_without": len(base[last]["front_plans"])})
    for ref in RANDOM_ARMS:  # ratios against each random baseline that was run (and has a front)
        if ref in out and out[ref][last] > 0:
            for arm in out:
                out[arm][f"vs_{ref}_{last}"] = round(out[arm][last] / out[ref][last], 3)
    return out


def update_docs(r: dict[str, Any], checkpoints: list[int], marker: str = "search_efficiency") -> None:
    n = r["normalisation"]
    left_out = [o for o in r["objectives"] if o not in r["hv_axes"]]
    why = (f"(an objective whose reference-to-ideal range is under 1% of its reference is left out: here "
           f"{', '.join(left_out)})" if left_out else "(all three objectives)")
    lines = [f"<!-- {marker}:begin -->",
             f"Measured {r['date']} with `{r['command']}` ({r['torch_threads']} torch thread, load average "
             f"{', '.join(f'{x:.2f}' for x in r['loadavg'])} at the end). Budget {r['budget_percent']}% of fp32; "
             f"reference point: {r['quality_metric']} {n['quality_ref']:.4f} ({n['quality_ref_from']}), "
             f"memory = budget ({n['memory_ref'] / 1e6:.2f} MB), latency = fp32 prediction ({n['latency_ref']:.2f} "
             f"ms); ideal: {r['quality_metric']} 1, the smallest plan's {n['memory_ideal'] / 1e6:.2f} MB and "
             f"{n['latency_ideal']:.2f} ms (the fastest plan). HV is measured on {' x '.join(r['hv_axes'])} {why}. "
             "Runs stop after "
             f"{r['over_budget_cap']} over-budget samples per requested trial; "
             f"{100 * r['random_plans_that_fit']:.3f}% of 20,000 unbiased random plans of the space fit the budget.",
             "",
             "| arm | seed | " + " | ".join(f"HV @{c}" for c in checkpoints) +
             f" | HV of its start points | gain over them @{checkpoints[-1]} | best {r['quality_metric']} "
             f"@{checkpoints[-1]} | counted trials | over-budget samples | front (start points) | trial time s |",
             "|---" * (len(checkpoints) + 9) + "|"]
    last = str(checkpoints[-1])
    for x in r["runs"]:
        s = x[last]
        best = "—" if s["best_quality"] is None else f"{s['best_quality']:.4f}"
        mark = "" if x["finished"] else " (unfinished)"
        lines.append(f"| {x['arm']}{mark} | {x['seed']} | " + " | ".join(f"{x[str(c)]['hv']:.5f}" for c in checkpoints)
                     + f" | {s['hv_start_points']:.5f} | {s['hv'] - s['hv_start_points']:+.5f} | {best} | "
                       f"{s['counted']} | {s['over_budget']} | {s['front']} ({s['front_start_points']}) | "
                       f"{x['trial_seconds']:.0f} |")
    for arm, s in r["summary"].items():
        if f"over_start_points_{last}" in s and not arm.startswith("random"):
            lines.append(f"\n{arm}: mean HV @{last} {s[last]:.5f} over its start points' {s['hv_start_points']:.5f} "
                         f"= **{s[f'over_start_points_{last}']:.3f}x** (seeds {', '.join(map(str, s['seeds']))}); "
                         "RandomSampler given the same start points keeps them, so this bounds its ratio to it.")
    refs = [a for a in RANDOM_ARMS if a in r["summary"]]
    lines += ["", "| arm | seeds (finished runs) | " + " | ".join(f"mean HV @{c}" for c in checkpoints) +
              "".join(f" | vs {a} @{last}" for a in refs) + " |", "|---" * (len(checkpoints) + 2 + len(refs)) + "|"]
    for arm, s in r["summary"].items():
        ratios = [s.get(f"vs_{a}_{last}") for a in refs]
        lines.append(f"| {arm} | {', '.join(map(str, s['seeds']))} | " +
                     " | ".join(f"{s[str(c)]:.5f}" for c in checkpoints) +
                     "".join(f" | {'—' if x is None else f'{x:.3f}x'}" for x in ratios) + " |")
    for arm, s in r["summary"].items():
        for v in s.get("vs_without", []):
            same = "the same front" if v["same_front"] else "not the same"
            lines.append(f"\nMulti-fidelity ({arm}, seed {v['seed']}, against the same arm and seed without it): "
                         f"trial time x{v['time_ratio']:.2f}, {v['pruned']} of {checkpoints[-1]} trials pruned, HV "
                         f"{v['hv']:.5f} vs {v['hv_without']:.5f}, front of {v['front']} vs {v['front_without']} "
                         f"plans, {v['front_plans_shared']} shared ({same}).")
    lines.append(f"<!-- {marker}:end -->")
    doc = ROOT / "docs" / "BENCHMARKS.md"
    text = doc.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text:
        title = "in the rich MiniLM space (heads, neurons, rank, bits, kernel)" if marker.endswith("speed") else ""
        text += f"\n## Search efficiency (hypervolume) {title}\n\n".replace(" \n", "\n") + begin + "\n" + end + "\n"
    a, b = text.index(begin), text.index(end)
    doc.write_text(text[:a] + "\n".join(lines) + text[b + len(end):])


if __name__ == "__main__":
    raise SystemExit(main())
