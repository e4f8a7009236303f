"""Benchmark: the Quickstart search on all-MiniLM-L6-v2, end to end, from a fresh run directory.

    python benchmarks/quickstart.py [--run-dir runs/bench-quickstart] [--trials N]

Writes benchmarks/results/quickstart.json and rewrites the Quickstart section of docs/BENCHMARKS.md
(between the `<!-- quickstart:begin -->` and `<!-- quickstart:end -->` markers). Records wall time,
trials per minute, the time per trial spent outside model forward passes, and the Pareto front
against the uniform baselines on held-out text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from slimformer.export.bench import cpu_model

ROOT = Path(__file__).resolve().parent.parent



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/bench-quickstart")
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args()

    import optuna
    import torch

    from slimformer.search import SearchConfig, run_search

    run_dir = Path(args.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = SearchConfig.load(None)
    t0 = time.perf_counter()
    res = run_search(cfg, run_dir=run_dir, trials=args.trials, progress=False, log=print)
    wall = time.perf_counter() - t0
    s = res.summary
    study = optuna.load_study(study_name=cfg.study_name, storage=res.storage)
    trials = study.get_trials(deepcopy=False)
    search_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                   if t.datetime_complete and t.datetime_start)
    pareto = json.loads((run_dir / "pareto.json").read_text())
    baselines = json.loads((run_dir / "baselines.json").read_text())
    m = s.quality_metric
    result = {
        "command": "python benchmarks/quickstart.py" + (f" --trials {args.trials}" if args.trials else ""),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "optuna": optuna.__version__,
        "wall_s": round(wall, 1),
        "trials": len(trials), "evaluated_trials": s.evaluated_trials,
        "infeasible_trials": s.infeasible_trials,
        "trials_per_min": round(len(trials) / (search_s / 60), 2) if search_s else None,
        "evaluated_trials_per_min": round(s.evaluated_trials / (search_s / 60), 2) if search_s else None,
        "mean_trial_s": s.mean_trial_s, "mean_forward_s": s.mean_eval_s,
        "mean_outside_forward_s": s.mean_outside_forward_s,
        "best_recipe": None if s.best_recipe is None else s.best_recipe.to_json(m),
        "best_baseline": None if s.best_baseline is None else s.best_baseline.to_json(m),
        "latency_label": s.latency_label,
        "pareto": [{k: e[k] for k in ("trial", "memory_percent", "latency_ms_estimate")} |
                   {"search": e["search_metrics"][m], "heldout": e["heldout_metrics"][m],
                    "heldout_neighbours": e["heldout_metrics"].get("neighbours")} for e in pareto["trials"]],
        "baselines": baselines,
    }
    out = ROOT / "benchmarks" / "results" / "quickstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    update_docs(result, m)
    print(json.dumps({k: result[k] for k in ("wall_s", "trials", "evaluated_trials", "trials_per_min",
                                              "mean_outside_forward_s", "best_recipe", "best_baseline")}, indent=2))
    return 0


def update_docs(r: dict, m: str) -> None:
    lines = [
        "<!-- quickstart:begin -->",
        f"Measured {r['date']} with `{r['command']}` on {r['cpu']} ({r['cores']} cores, {r['threads']} torch "
        f"threads), torch {r['torch']}, optuna {r['optuna']}.",
        "",
        "| quantity | value |", "|---|---|",
        f"| wall time, whole command (model load, teacher outputs, baselines, sensitivity, search, held-out "
        f"re-scoring, report) | {r['wall_s']} s |",
        f"| trials (evaluated / over budget, not evaluated) | {r['trials']} ({r['evaluated_trials']} / "
        f"{r['infeasible_trials']}) |",
        f"| trials per minute (all / evaluated) | {r['trials_per_min']} / {r['evaluated_trials_per_min']} |",
        f"| mean evaluated trial | {r['mean_trial_s']:.2f} s |",
        f"| of which model forward passes (128 texts) | {r['mean_forward_s']:.2f} s |",
        f"| of which outside forward passes (sampling, memory, compression, bookkeeping) | "
        f"{r['mean_outside_forward_s']:.3f} s |",
        "",
        f"Held-out {m} (256 texts never used by the search) within the 15% budget:",
        "",
        "| plan | memory % of fp32 | held-out " + m + " | held-out top-10 neighbours |", "|---|---|---|---|",
    ]
    best = r["best_recipe"]
    if best:
        lines.append(f"| **best searched recipe** (trial {best['trial']}) | {best['memory_percent']:.2f} | "
                     f"**{best['heldout_metrics'][m]:.4f}** | {best['heldout_metrics'].get('neighbours', 0):.3f} |")
    for b in r["baselines"]:
        if b["fits"] and b["heldout_metrics"]:
            lines.append(f"| {b['name']} | {b['memory_percent']:.2f} | {b['heldout_metrics'][m]:.4f} | "
                         f"{b['heldout_metrics'].get('neighbours', 0):.3f} |")
        else:
            lines.append(f"| {b['name']} | {b['memory_percent']:.2f} | does not fit the budget | |")
    label = r.get("latency_label", "roofline estimate")
    lines += ["", f"Pareto front (feasible trials; latency: {label}; batch 1, 128 tokens):", "",
              "| trial | memory % | latency ms (predicted) | search " + m + " | held-out " + m + " |",
              "|---|---|---|---|---|"]
    for e in sorted(r["pareto"], key=lambda e: e["memory_percent"]):
        lines.append(f"| {e['trial']} | {e['memory_percent']:.2f} | {e['latency_ms_estimate']:.2f} | "
                     f"{e['search']:.4f} | {e['heldout']:.4f} |")
    lines.append("<!-- quickstart:end -->")
    doc = ROOT / "docs" / "BENCHMARKS.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n## Quickstart search\n\n<!-- quickstart:begin -->\n" \
                                                 "<!-- quickstart:end -->\n"
    start, end = text.index("<!-- quickstart:begin -->"), text.index("<!-- quickstart:end -->")
    text = text[:start] + "\n".join(lines) + text[end + len("<!-- quickstart:end -->"):]
    doc.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
