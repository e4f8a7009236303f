"""Benchmark: a speed-aware search on all-MiniLM-L6-v2 (issue 13 item 7): heads, neurons, rank, bits and kernel
axes under 15% of the fp32 bytes, the calibrated latency objective, recovery in the loop; the front exported to
ONNX and timed in one interleaved run against fp32 and onnxruntime dynamic int8.

    python benchmarks/speed_front.py                      # search (runs/speed-front), export, quality, timing
    python benchmarks/speed_front.py --reuse runs/speed-front   # export (cached) + quality + timing only
    python benchmarks/speed_front.py --smoke              # tiny settings, end to end, for a check under load

Phases:
1. search (unless --reuse): the config below (NSGA-II, `recover_in_search` distilling the most promising
   structural plans, hardware profile amd-epyc-avx512-1t-ort1-32, latency at 1 x 128, 1 thread);
2. export: every Pareto plan (at most --max-plans, spread along latency) to ONNX with its per-unit kernels,
   a recovered plan from its saved recovered model (run_dir/recovered/trial-N), cached in RUN_DIR-onnx/;
3. quality: each export's cosine to the fp32 teacher on the search set (agreement with the search's score:
   target <= 0.003), on held-out fortunes and on held-out python-docs (a second domain, never searched);
4. timing: fp32, ORT dynamic int8 per tensor / per channel and every plan, round robin with a rotating start
   (`export.bench.time_round_robin`, each turn runs twice and times the second: weights warm in cache),
   --runs rounds, --threads intra-op threads, batch 1 x 128 tokens; medians of per-round ratios;
5. writes benchmarks/results/speed_front.json and .md and the `speed-front` section of docs/BENCHMARKS.md;
   --write-recipe PATH copies the winning plan's recipe there (examples/recipes/minilm-speed.yaml).

Acceptance (issue 13): a plan <= 15% of the fp32 bytes with held-out cosine >= 0.98 at <= 0.75x ORT int8 per
channel and <= 0.40x fp32; measured latencies of the front span >= 2x; predicted vs measured within +-10% for
>= 90% of the plans; search-set vs ONNX quality within 0.003 for every plan.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PROFILE = "amd-epyc-avx512-1t-ort1-32"
LINEARS = ["query", "key", "value", "attn_out"]


def search_config(run_dir: Path, trials: int, top_k: int, steps: int, smoke: bool) -> dict[str, Any]:
    """The speed-aware search: MiniLM, 15% of fp32 (ONNX bytes), quality x latency x memory."""
    return {
        "model": MODEL,
        "data": {"source": "fortunes", "search_samples": 16 if smoke else 128,
                 "heldout_samples": 16 if smoke else 256, "calibration_samples": 8 if smoke else 64},
        "space": {"per_layer": False, "groups": [
            {"select": {"role": ["embedding"]}, "bits": [4], "group_size": [32, 64, 128]},
            {"select": {"role": LINEARS}, "bits": [8, 4], "group_size": [None, 32], "kernel": ["exact", "int8"],
             "rank_fraction": [1.0, 0.5], "heads_kept": [12, 10, 8, 6]},
            {"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4], "group_size": [None, 32],
             "kernel": ["exact", "int8"], "rank_fraction": [1.0, 0.5],
             "neurons_kept": [1.0, 0.75, 0.5, 0.375, 0.25]},
        ]},
        "budget": {"memory": "15%"},
        "objectives": ["quality", "latency", "memory"],
        "sampler": {"name": "nsga2", "population_size": 4 if smoke else 16, "seed": 0},
        "trials": trials,
        "hardware_profile": PROFILE,
        "latency": {"source": "calibrated", "batch": 1, "seq": 128, "threads": 1},
        "start_points": "random" if smoke else "sensitivity",
        "baselines": False,
        "recover_in_search": {"top_k": top_k, "steps": steps, **({"samples": 64, "batch_size": 8} if smoke else {})},
        "deploy": "onnx",
        "threads": 2,
        "run_dir": str(run_dir),
        "study_name": "speed-front",
    }


def spread_pick(entries: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most `n` entries spread evenly along predicted latency (all of them when there are fewer)."""
    ordered = sorted(entries, key=lambda e: e["latency_ms_estimate"])
    if len(ordered) <= n:
        return ordered
    idx = sorted({round(i * (len(ordered) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [ordered[i] for i in idx]


def export_plan(run_dir: Path, entry: dict[str, Any], out_root: Path, log: Any) -> Path:
    """The plan's ONNX file (cached): a recovered plan from its saved model, any other applied from its recipe."""
    from slimformer.api import apply_recipe, export_model

    out = out_root / f"trial-{entry['trial']}"
    onnx = out / "onnx" / "model.onnx"
    if onnx.is_file():
        return onnx
    if out.exists():
        shutil.rmtree(out)
    if "recovered_from" in entry:
        saved = run_dir / "recovered" / f"trial-{entry['trial']}"
        shutil.copytree(saved, out)
        export_model(out, log=log)
    else:
        apply_recipe(run_dir / entry["recipe"], MODEL, out_dir=out, samples=64, onnx=True, log=log)
    return onnx


def quality(reference: Any, onnx_path: Path, sets: dict[str, tuple[Any, np.ndarray]]) -> dict[str, float]:
    """Cosine of the ONNX model's pooled embeddings to the fp32 torch teacher's, per data set."""
    import torch

    from slimformer.export.onnx_export import onnx_outputs
    from slimformer.models.metrics import encoder_metrics

    out = {}
    for name, (batches, teacher) in sets.items():
        emb = onnx_outputs(onnx_path, batches, threads=1)
        out[name] = encoder_metrics(torch.from_numpy(teacher), torch.from_numpy(emb.astype(np.float32)))["cosine"]
    return out


def quality_sets(reference: Any, cfg: dict[str, Any], heldout: int) -> dict[str, tuple[Any, np.ndarray]]:
    """The search set (as the search drew it), held-out fortunes and held-out python-docs, with teacher outputs."""
    import torch

    d = cfg["data"]
    drawn = reference.eval_samples(d["source"], d["search_samples"], d["heldout_samples"],
                                   d["calibration_samples"], d.get("seed", 0))
    sets = {"search": reference.make_batches(drawn.search.inputs, 32),
            "fortunes": reference.make_batches(reference.heldout_samples("fortunes", heldout).inputs, 32),
            "python-docs": reference.make_batches(reference.heldout_samples("python-docs", heldout).inputs, 32)}
    with torch.no_grad():
        return {k: (b, torch.cat([reference.output(reference.model, x) for x in b]).numpy()) for k, b in sets.items()}


def time_plans(reference: Any, plans: dict[str, Path], threads: int, runs: int, work: Path, log: Any) -> dict[str, Any]:
    """One interleaved timing run at 1 x 128: fp32, ORT dynamic int8 (per tensor, per channel) and every plan."""
    from slimformer.export.bench import (
        FP32,
        INT8_CHANNEL,
        INT8_TENSOR,
        fixed_length_feed,
        quantize_int8_dynamic,
        time_round_robin,
    )
    from slimformer.export.onnx_export import export_fp32, session

    work.mkdir(parents=True, exist_ok=True)
    paths = {FP32: work / "fp32.onnx"}
    if not paths[FP32].is_file():
        export_fp32(reference, paths[FP32])
    paths[INT8_TENSOR] = work / "int8-dynamic-tensor.onnx"
    paths[INT8_CHANNEL] = work / "int8-dynamic-channel.onnx"
    for name, per_channel in ((INT8_TENSOR, False), (INT8_CHANNEL, True)):
        if not paths[name].is_file():
            quantize_int8_dynamic(paths[FP32], paths[name], per_channel)
    paths.update(plans)
    sessions = {n: session(p, threads) for n, p in paths.items()}
    texts = reference.heldout_samples("fortunes", 8).inputs
    feed = fixed_length_feed(reference, texts, 1, 128)
    log(f"timing {len(sessions)} models: {runs} rounds, {threads} thread(s), 1 x 128")
    t = time_round_robin(sessions, feed, runs, warmup=3, repeat=2)
    arr = {n: np.asarray(v) for n, v in t.items()}

    def med(x: np.ndarray) -> float:
        return float(np.median(x))

    return {"ms": {n: med(a) for n, a in arr.items()},
            "x_fp32": {n: med(a / arr[FP32]) for n, a in arr.items()},
            "x_int8_channel": {n: med(a / arr[INT8_CHANNEL]) for n, a in arr.items()},
            "x_int8_tensor": {n: med(a / arr[INT8_TENSOR]) for n, a in arr.items()},
            "file_bytes": {n: p.stat().st_size for n, p in paths.items()}}


def markdown(res: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section."""
    a = res["acceptance"]
    lines = [f"Command: `{res['command']}` ({res['date']}, {res['cpu']}, onnxruntime {res['onnxruntime']}, "
             f"{res['threads']} thread, batch 1 x 128 tokens, {res['runs']} interleaved rounds, medians of per-round "
             f"ratios; load average {res['loadavg']}). Search: {res['search']['trials']} trials, recovery in the "
             f"search: top {res['search']['top_k']} structural plans, {res['search']['steps']} steps each.", "",
             "| trial | recovered | ONNX bytes, % fp32 | search cos (search / ONNX) | held-out fortunes | "
             "held-out python-docs | predicted ms | measured ms | pred/meas | x fp32 | x ORT int8 ch. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res["plans"]:
        lines.append(f"| {p['trial']} | {'yes' if p['recovered'] else 'no'} | {p['onnx_percent']:.2f} | "
                     f"{p['search_cosine']:.4f} / {p['onnx_search_cosine']:.4f} | {p['fortunes_cosine']:.4f} | "
                     f"{p['python_docs_cosine']:.4f} | {p['predicted_ms']:.2f} | {p['measured_ms']:.2f} | "
                     f"{p['predicted_ms'] / p['measured_ms']:.3f} | {p['x_fp32']:.3f} | {p['x_int8_channel']:.3f} |")
    b = res["baselines"]
    t, c = b["int8-dynamic-tensor"], b["int8-dynamic-channel"]
    lines += ["", f"Baselines: fp32 {b['fp32']['ms']:.2f} ms; ORT dynamic int8 per tensor {t['ms']:.2f} ms "
              f"({t['x_fp32']:.3f}x fp32); per channel {c['ms']:.2f} ms ({c['x_fp32']:.3f}x fp32).", "",
              f"- winner (<= 15%, held-out fortunes cosine >= 0.98, <= 0.75x ORT int8 per channel, <= 0.40x fp32): "
              f"{a['winner'] if a['winner'] is not None else 'none'}",
              f"- latency span of the front (slowest / fastest measured): {a['span']:.2f}x (target >= 2x)",
              f"- predicted within +-10% of measured: {a['within_10pct']} of {len(res['plans'])} (target >= 90%)",
              f"- largest search-set vs ONNX cosine gap: {a['max_quality_gap']:.4f} (target <= 0.003)"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, help="a finished search run dir: skip the search")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "speed-front")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--top-k", type=int, default=4, help="recover_in_search: structural plans distilled")
    ap.add_argument("--steps", type=int, default=300, help="recover_in_search: distillation steps per plan")
    ap.add_argument("--max-plans", type=int, default=10, help="front plans exported and timed (spread on latency)")
    ap.add_argument("--runs", type=int, default=60, help="interleaved timing rounds (>= 30 for the acceptance)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=256, help="held-out texts per domain")
    ap.add_argument("--smoke", action="store_true", help="tiny settings end to end (4 trials, 2 steps, 3 rounds)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_front.json")
    ap.add_argument("--write-recipe", type=Path, help="copy the winning plan's recipe here")
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.top_k, args.steps, args.max_plans, args.runs, args.heldout = 4, 1, 2, 2, 3, 16
        if args.run_dir == ap.get_default("run_dir"):
            args.run_dir = ROOT / "runs" / "speed-front-smoke"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from slimformer.api import search
    from slimformer.compression.saving import load_any
    from slimformer.export.bench import INT8_CHANNEL, cpu_model

    def log(msg: str) -> None:
        print(f"[speed_front {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.perf_counter()
    run_dir = args.reuse or args.run_dir
    if args.reuse is None:
        cfg = search_config(run_dir, args.trials, args.top_k, args.steps, args.smoke)
        cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log(f"searching ({args.trials} trials) into {run_dir}")
        search(cfg_path, progress=False, log=log)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    search_s = time.perf_counter() - t0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    fp32_bytes = pareto["fp32_bytes"]
    picked = spread_pick(pareto["trials"], args.max_plans)
    log(f"{len(pareto['trials'])} Pareto plans; exporting {len(picked)}")
    onnx_root = run_dir.parent / f"{run_dir.name}-onnx"
    exports = {f"trial-{e['trial']}": export_plan(run_dir, e, onnx_root, log) for e in picked}
    reference = load_any(MODEL)
    sets = quality_sets(reference, cfg, args.heldout)
    qual = {name: quality(reference, p, sets) for name, p in exports.items()}
    load_before = os.getloadavg()[0]
    timing = time_plans(reference, exports, args.threads, args.runs, onnx_root / "baselines", log)
    plans = []
    for e in picked:
        n = f"trial-{e['trial']}"
        q = qual[n]
        plans.append({
            "trial": e["trial"], "recovered": "recovered_from" in e, "recovered_from": e.get("recovered_from"),
            "recipe": str(run_dir / e["recipe"]), "onnx_bytes": timing["file_bytes"][n],
            "onnx_percent": 100 * timing["file_bytes"][n] / fp32_bytes, "priced_percent": e["memory_percent"],
            "search_cosine": e["search_metrics"]["cosine"], "onnx_search_cosine": q["search"],
            "unrecovered_search_cosine": (e.get("unrecovered_search_metrics") or {}).get("cosine"),
            "heldout_cosine_torch": e["heldout_metrics"]["cosine"], "fortunes_cosine": q["fortunes"],
            "python_docs_cosine": q["python-docs"], "predicted_ms": e["latency_ms_estimate"],
            "measured_ms": timing["ms"][n], "x_fp32": timing["x_fp32"][n],
            "x_int8_channel": timing["x_int8_channel"][n], "x_int8_tensor": timing["x_int8_tensor"][n]})
    ok = [p for p in plans if p["onnx_percent"] <= 15.0 and p["fortunes_cosine"] >= 0.98
          and p["x_int8_channel"] <= 0.75 and p["x_fp32"] <= 0.40]
    winner = min(ok, key=lambda p: p["x_int8_channel"], default=None)
    measured = [p["measured_ms"] for p in plans]
    acceptance = {
        "winner": None if winner is None else winner["trial"],
        "span": max(measured) / min(measured) if measured else 0.0,
        "within_10pct": sum(1 for p in plans if abs(p["predicted_ms"] / p["measured_ms"] - 1) <= 0.10),
        "max_quality_gap": max((abs(p["search_cosine"] - p["onnx_search_cosine"]) for p in plans), default=0.0)}
    import onnxruntime as ort

    res = {"command": "python benchmarks/speed_front.py" + (f" --reuse {args.reuse}" if args.reuse else "")
           + (" --smoke" if args.smoke else "") + f" --runs {args.runs}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
           "onnxruntime": ort.__version__, "threads": args.threads, "runs": args.runs,
           "loadavg": f"{load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after",
           "search": {"run_dir": str(run_dir), "trials": cfg["trials"],
                      "top_k": (cfg.get("recover_in_search") or {}).get("top_k"),
                      "steps": (cfg.get("recover_in_search") or {}).get("steps"), "seconds": round(search_s, 1)},
           "baselines": {n: {"ms": timing["ms"][n], "x_fp32": timing["x_fp32"][n],
                             "file_bytes": timing["file_bytes"][n]}
                         for n in ("fp32", "int8-dynamic-tensor", INT8_CHANNEL)},
           "plans": plans, "acceptance": acceptance, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    args.out.with_suffix(".md").write_text(table + "\n")
    if not args.no_doc:
        from slimformer.cli_profiles import update_bench_doc

        update_bench_doc("speed-front", table, ROOT / "docs" / "BENCHMARKS.md")
    if args.write_recipe is not None and winner is not None:
        args.write_recipe.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(winner["recipe"], args.write_recipe)
    print(table, flush=True)
    log(f"wrote {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
