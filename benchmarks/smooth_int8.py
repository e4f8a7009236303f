"""Benchmark: per-unit SmoothQuant for `kernel: int8` units (UnitSpec.smooth, issue 13), quality only.

    python benchmarks/smooth_int8.py [--samples 256] [--alphas 0.5,0.65,0.8] [--onnx] [--quick]

Two MiniLM plans whose linears all run the int8 GEMM (activations quantised per tensor at run time, simulated in
torch exactly as the export runs it), without recovery:
  fast15  examples/recipes/minilm-fast15.yaml (int4 g128 GPTQ linears, per-row int4 token table; its own `smooth`
          is replaced by each alpha below, or removed);
  15pct   examples/recipes/minilm-15pct.yaml with `kernel: int8` forced on every linear (tiered token table).
Each is compressed once (GPTQ Hessians and SmoothQuant statistics from the 64 fortunes calibration texts that
`slimformer apply`/`bench` use), then scored unsmoothed and smoothed with each alpha (factors re-set on the same
weights: compression/smoothing.py). alpha is CHOSEN on the search split (256 texts per domain after the calibration
texts, disjoint from held-out; mean cosine over both plans and both domains); held-out (256 fortunes / 256
python-docs texts, what `slimformer bench --data X` scores) is only reported. --onnx exports the chosen smoothed
fast15 plan and scores the ONNX file on both held-out sets (target: within 0.003 of torch).
Writes benchmarks/results/smooth_int8.json. Quality numbers do not depend on machine load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DOMAINS = ("fortunes", "python-docs")
CALIBRATION = ("fortunes", 64)  # apply_recipe's defaults: --data fortunes, calibration 64


def plans(reference: Any) -> dict[str, Any]:
    """The two unsmoothed int8-kernel plans (CompressionPlan) by name."""
    from dataclasses import replace

    from slimformer.compression.recipe import Recipe

    fast = Recipe.load(ROOT / "examples" / "recipes" / "minilm-fast15.yaml").to_plan(reference)
    base = Recipe.load(ROOT / "examples" / "recipes" / "minilm-15pct.yaml").to_plan(reference)
    lin = {u.name for u in reference.units if u.kind == "linear"}
    forced = replace(base, units={n: replace(s, kernel="int8") if n in lin else s for n, s in base.units.items()})
    return {"fast15": fast, "15pct-int8": forced}


def with_alpha(plan: Any, alpha: float | None) -> Any:
    from dataclasses import replace

    return replace(plan, units={n: replace(s, smooth=alpha) if s.kernel == "int8" else s
                                for n, s in plan.units.items()})


def set_smoothing(model: Any, reference: Any, plan: Any, act_max: dict[str, Any]) -> None:
    """Re-set every int8 unit's factors on the already compressed model (None: unsmoothed)."""
    from slimformer.compression.modules import SlimLinear
    from slimformer.compression.smoothing import smooth_units

    for m in model.modules():
        if isinstance(m, SlimLinear):
            m.smooth = None
    smooth_units(model, reference, plan, act_max, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--alphas", default="0.5,0.65,0.8")
    ap.add_argument("--onnx", action="store_true", help="export the chosen smoothed fast15 plan and score it")
    ap.add_argument("--quick", action="store_true", help="32 texts per set, one plan: a plumbing check")
    args = ap.parse_args()
    from slimformer.api import load_model
    from slimformer.compression.apply import apply_plan
    from slimformer.compression.calibration import collect_hessians, collect_input_abs_max
    from slimformer.compression.memory import plan_memory, set_deploy
    from slimformer.compression.plan import CompressionPlan
    from slimformer.data import text_sets
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.export import export_onnx, graph_overhead_bytes, onnx_outputs

    t0 = time.time()
    n = 32 if args.quick else args.samples
    alphas = [float(a) for a in args.alphas.split(",")]
    reference = load_model(MODEL)
    set_deploy(reference, "onnx", graph_overhead_bytes(reference))
    fp32 = plan_memory(reference, CompressionPlan()).fp32_bytes
    cal = reference.make_batches(reference.calibration_samples(*CALIBRATION), 32)
    hessians = collect_hessians(reference, cal)
    act_max = collect_input_abs_max(reference, cal)
    evals = {}
    for d in DOMAINS:
        search = sorted(text_sets(d, CALIBRATION[1], n, n).search, key=len)
        evals[("search", d)] = FidelityEvaluator(reference, reference.make_batches(search, 32))
        evals[("heldout", d)] = FidelityEvaluator(reference, reference.make_batches(
            reference.heldout_samples(d, n).inputs, 32))
    rows: dict[str, Any] = {}
    models = {}
    chosen_plans = plans(reference)
    if args.quick:
        chosen_plans = {"fast15": chosen_plans["fast15"]}
    for name, plan in chosen_plans.items():
        model = apply_plan(reference, plan, hessians=hessians, act_max=act_max)
        models[name] = model
        rows[name] = {"percent_onnx_bound": {}, "scores": {}}
        for alpha in [None, *alphas]:
            p = with_alpha(plan, alpha)
            set_smoothing(model, reference, p, act_max)
            rows[name]["percent_onnx_bound"][str(alpha)] = round(100 * plan_memory(reference, p).total_bytes / fp32, 3)
            rows[name]["scores"][str(alpha)] = {f"{split}/{d}": round(ev.evaluate(model).metrics["cosine"], 5)
                                                for (split, d), ev in evals.items()}
            print(name, alpha, json.dumps(rows[name]["scores"][str(alpha)]), flush=True)
    search_mean = {a: sum(rows[nm]["scores"][str(a)][f"search/{d}"] for nm in rows for d in DOMAINS)
                   / (len(rows) * len(DOMAINS)) for a in alphas}
    best = max(alphas, key=lambda a: search_mean[a])
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "samples": n,
                           "alphas": alphas, "search_mean": {str(a): round(v, 5) for a, v in search_mean.items()},
                           "chosen_alpha": best, "plans": rows}
    print("search-split mean cosine by alpha", out["search_mean"], "chosen", best, flush=True)
    if args.onnx:
        model = models["fast15"]
        p = with_alpha(chosen_plans["fast15"], best)
        set_smoothing(model, reference, p, act_max)
        with tempfile.TemporaryDirectory() as tmp:
            info = export_onnx(reference, model, Path(tmp) / "m.onnx")
            onnx_scores = {}
            for d in DOMAINS:
                ev = evals[("heldout", d)]
                got = torch.from_numpy(onnx_outputs(info.path, ev.batches, threads=1))
                onnx_scores[d] = round(ev.score(got).metrics["cosine"], 5)
            torch_scores = {d: rows["fast15"]["scores"][str(best)][f"heldout/{d}"] for d in DOMAINS}
            out["onnx"] = {"alpha": best, "file_bytes": info.file_bytes,
                           "percent": round(100 * info.file_bytes / fp32, 3),
                           "bound_bytes": plan_memory(reference, p).total_bytes, "heldout_onnx": onnx_scores,
                           "heldout_torch": torch_scores,
                           "gap": round(max(abs(onnx_scores[d] - torch_scores[d]) for d in DOMAINS), 5)}
            print("onnx", json.dumps(out["onnx"]), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    if not args.quick:
        (ROOT / "benchmarks" / "results" / "smooth_int8.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
