"""Benchmark: Quickstart Pareto recipes exported to ONNX against fp32 and onnxruntime dynamic int8.

    python benchmarks/export_bench.py [--budgets 15,25] [--kernels exact,fast] [--trials-25 32] [--threads 2]
                                      [--runs 30] [--batches 1,32]

For each budget B (percent of fp32 weight bytes) it takes the search run for that budget (the embedded
Quickstart, 15%, in runs/bench-export; the Quickstart with `budget: {memory: B%}` and fewer trials in
runs/bench-export-B), running the search first unless the run's pareto.json exists. From pareto.json it
picks the Pareto recipe with the highest held-out cosine within B% of fp32 bytes, applies it to
all-MiniLM-L6-v2 with `--onnx` once per kernel mode (runs/bench-export-apply-B, -B-fast) and benches each
export (`slimformer bench`: fp32, dynamic int8 per tensor / per channel, target; --threads, --batches,
seq 64 and 128, --runs round-robin runs). Writes benchmarks/results/export_bench.json and .md, and the
table between the `export` markers of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
NAMES = {"fp32": "fp32 (ONNX)", "int8-dynamic-tensor": "ORT dynamic int8, per tensor",
         "int8-dynamic-channel": "ORT dynamic int8, per channel", "target": "slimformer recipe"}


def run_dir_for(budget: int) -> Path:
    return ROOT / "runs" / ("bench-export" if budget == 15 else f"bench-export-{budget}")


def ensure_search(budget: int, trials: int, log: Any) -> Path:
    from slimformer.api import search
    from slimformer.search.config import QUICKSTART_CONFIG

    rd = run_dir_for(budget)
    if (rd / "pareto.json").exists():
        log(f"reusing {rd}")
        return rd
    if budget == 15:
        search(None, run_dir=rd, progress=False, log=log)
        return rd
    text = QUICKSTART_CONFIG.read_text()
    text = text.replace("budget: {memory: 15%}", f"budget: {{memory: {budget}%}}")
    text = text.replace("study_name: quickstart", f"study_name: bench-export-{budget}")
    cfg = ROOT / "runs" / f"bench-export-{budget}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    if not cfg.exists():
        cfg.write_text(text.replace("trials: 80", f"trials: {trials}"))
    search(cfg, run_dir=rd, progress=False, log=log)
    return rd


def pick(run_dir: Path, budget: int) -> dict[str, Any]:
    pareto = json.loads((run_dir / "pareto.json").read_text())
    m = pareto["quality_metric"]
    limit = budget / 100 * pareto["fp32_bytes"]
    fits = [e for e in pareto["trials"] if e["memory_bytes"] <= limit]
    if not fits:
        raise SystemExit(f"{run_dir}: no Pareto recipe within {budget}% of fp32")
    best = max(fits, key=lambda e: e["heldout_metrics"][m])
    return {"trial": best["trial"], "recipe": str(run_dir / best["recipe"]), "memory_bytes": best["memory_bytes"],
            "memory_percent": best["memory_percent"], "heldout_cosine": best["heldout_metrics"][m],
            "plan": best.get("plan")}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"ONNX Runtime {meta['onnxruntime']}, {meta['cpu']}, {meta['threads']} intra-op threads, "
             f"{meta['runs']} timed runs per model and shape, round-robin across the four models "
             f"(latency: median ms; ×fp32 = median of the per-round ratios to fp32). Fidelity: mean cosine of "
             f"the pooled embedding to the fp32 ONNX model on {meta['samples']} held-out fortunes texts. "
             f"Inputs: held-out texts padded/truncated to exactly seq tokens. {meta['date']}.", ""]
    shapes = [(b, s) for b in meta["batches"] for s in meta["seqs"]]
    for r in results:
        p = r["picked"]
        kern = r.get("kernels", "exact")
        lines += [f"**Budget {r['budget']}%, {kern} kernels** — Pareto trial {p['trial']} of `{r['run_dir']}` "
                  f"({p['memory_percent']:.2f}% of fp32 by plan_memory, held-out cosine {p['heldout_cosine']:.4f} "
                  f"in the search; ONNX vs torch cosine {r['apply']['onnx_cosine']:.6f}; load average "
                  f"{r.get('loadavg', 'n/a')}).", ""]
        head = "| model | file MB | file % fp32 | resident MB | resident % fp32 | cosine |" + "".join(
            f" {b}×{s} ms (×fp32) |" for b, s in shapes)
        lines += [head, "|" + "---|" * (6 + len(shapes))]
        models = r["bench"]["models"]
        fp32 = next(m for m in models if m["name"] == "fp32")
        for m in models:
            cells = []
            for b, s in shapes:
                x = next(x for x in m["latency"] if x["batch"] == b and x["seq"] == s)
                cells.append(f" {x['ms']['median']:.1f} (×{x['ratio_to_fp32']['median']:.2f}) |")
            pct = 100 * m["resident_bytes"] / fp32["resident_bytes"]
            fpct = 100 * m["file_bytes"] / fp32["file_bytes"]
            name = NAMES.get(m["name"], m["name"]) + (f" ({kern} kernels)" if m["name"] == "target" else "")
            lines.append(f"| {name} | {m['file_bytes'] / 1e6:.2f} | {fpct:.1f} | "
                         f"{m['resident_bytes'] / 1e6:.2f} | {pct:.1f} | "
                         f"{m['fidelity']['cosine']:.4f} |" + "".join(cells))
        ratios = {(x["baseline"], x["batch"], x["seq"]): x["ratio"] for x in r["bench"]["target_ratios"]}
        lines += ["", "slimformer recipe latency ÷ baseline, median of per-round ratios [q1, q3]:", "",
                  "| batch×seq | ÷ fp32 | ÷ int8 per tensor | ÷ int8 per channel |", "|---|---|---|---|"]
        for b, s in shapes:
            lines.append(f"| {b}×{s} |" + "".join(
                f" {ratios[(base, b, s)]['median']:.2f} [{ratios[(base, b, s)]['q1']:.2f}, "
                f"{ratios[(base, b, s)]['q3']:.2f}] |"
                for base in ("fp32", "int8-dynamic-tensor", "int8-dynamic-channel")))
        lines.append("")
    return "\n".join(lines)


def update_doc(table: str) -> None:
    """Replace the `export` section of docs/BENCHMARKS.md (between its begin/end markers)."""
    from slimformer.cli_profiles import update_bench_doc

    update_bench_doc("export", table.rstrip(), ROOT / "docs" / "BENCHMARKS.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="15,25", help="comma-separated percents of fp32 bytes")
    ap.add_argument("--trials-25", type=int, default=32, help="trials of the extra (non-15%%) searches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--kernels", default="exact,fast", help="comma-separated ONNX kernel modes to export and bench")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))

    from slimformer.api import apply_recipe, bench

    def log(msg: str) -> None:
        print(f"[export_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    out_json = ROOT / "benchmarks" / "results" / "export_bench.json"
    out_md = out_json.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    results = {(r["budget"], r.get("kernels", "exact")): r for r in previous.get("results", [])}
    meta: dict[str, Any] = {}
    t0 = time.perf_counter()
    for budget in (int(b) for b in args.budgets.split(",")):
        rd = ensure_search(budget, args.trials_25, log)
        picked = pick(rd, budget)
        log(f"budget {budget}%: trial {picked['trial']} ({picked['memory_percent']:.2f}% of fp32, "
            f"held-out cosine {picked['heldout_cosine']:.4f})")
        for kern in args.kernels.split(","):
            out_dir = ROOT / "runs" / f"bench-export-apply-{budget}{'' if kern == 'exact' else '-' + kern}"
            applied = apply_recipe(picked["recipe"], MODEL, out_dir=out_dir, samples=args.samples, onnx=True,
                                   kernels=kern)
            assert applied.onnx is not None
            log(f"applied ({kern} kernels): fidelity {applied.fidelity}; {applied.onnx.path} "
                f"{applied.onnx.file_bytes:,d} bytes, ONNX vs torch cosine {applied.onnx.cosine:.6f}")
            load_before = os.getloadavg()[0]
            res = bench(applied.onnx.path, MODEL, samples=args.samples, threads=args.threads, seqs=(64, 128),
                        batches=batches, runs=args.runs, log=log)
            print(res.format(), flush=True)
            d = res.to_dict()
            meta = {k: d[k] for k in ("threads", "runs", "samples", "batches", "seqs", "cpu", "onnxruntime", "date")}
            results[(budget, kern)] = {
                "budget": budget, "kernels": kern, "run_dir": str(rd.relative_to(ROOT)), "picked": picked,
                "loadavg": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
                "apply": {"out_dir": str(out_dir.relative_to(ROOT)), "fidelity": applied.fidelity,
                          "onnx_file_bytes": applied.onnx.file_bytes,
                          "onnx_resident_bytes": applied.onnx.resident_bytes,
                          "onnx_cosine": applied.onnx.cosine, "onnx_max_abs_diff": applied.onnx.max_abs_diff},
                "bench": d}
        ordered = [results[k] for k in sorted(results)]
        out_json.write_text(json.dumps({"command": f"python benchmarks/export_bench.py --budgets {args.budgets} "
                                                   f"--kernels {args.kernels} --batches {args.batches}",
                                        "model": MODEL, **meta, "results": ordered}, indent=2) + "\n")
        out_md.write_text(markdown(ordered, meta) + "\n")
        update_doc(markdown(ordered, meta))
        log(f"wrote {out_json} and {out_md} ({time.perf_counter() - t0:.0f} s so far)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
