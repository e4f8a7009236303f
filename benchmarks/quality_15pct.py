"""Benchmark: MiniLM at <= 15% of the fp32 bytes (deployed ONNX file), no recovery, with frequency-tiered embeddings.

    python benchmarks/quality_15pct.py [--budget 15] [--samples 256] [--write-recipe] [--quick]

What it measures (all-MiniLM-L6-v2, deploy onnx: bytes are the accounted ONNX file, an upper bound checked against
the exported file for the chosen plan):
  1. the embedding table alone: fp32, uniform int4 g64, and tier layouts (rows ranked by token frequency on the
     fortunes search split, 600 texts, disjoint from the held-out texts; rare rows int2 g64 or product-quantised
     `pq/4`, `pq/8`) -> bytes freed, fidelity with int8 linears;
  2. candidate plans (linear settings x embedding settings): bytes and held-out fidelity (cosine, top-10 neighbour
     agreement) on the packaged held-out fortunes and on python-docs (`heldout_samples`, what `slimformer bench
     --data X --samples N` scores); the best plan within the budget (highest min cosine over both domains) is
     exported to ONNX and scored again (torch vs ONNX must agree within 0.002);
  3. the ablations: the chosen plan's linears with the embedding tiers off (uniform int4 g64 table), and the pq
     codec off (the same tier boundaries with int2 g64 rare rows).
Writes benchmarks/results/quality_15pct.json, the table between the `quality-15pct` markers of docs/BENCHMARKS.md
and, with --write-recipe, examples/recipes/minilm-15pct.yaml (the chosen plan; the token ranking is stored in it).
`slimformer bench examples/recipes/minilm-15pct.yaml --model ... --data TEXT --kernels exact` reproduces its size on
any text and its fidelity up to the GPTQ calibration text (`bench` calibrates on 64 texts of --data, this script on
128 texts of the fortunes search split; `--method rtn` makes the weights independent of any text).
Quality numbers do not depend on machine load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ATTN = ("query", "key", "value", "attn_out")
EMB_CHOICES: dict[str, str] = {  # name -> tier layout ("uniform:BITS/GROUP" = no tiers)
    "fp32": "uniform:32",
    "int4 g64 (no tiers)": "uniform:4/64",
    "int2 g64 (no tiers)": "int2/64",
    "tiers int4/64:26000,int2/64": "int4/64:26000,int2/64",
    "tiers int4/64:20000,int2/64": "int4/64:20000,int2/64",
    "tiers int8:2000,int4/64:18000,int2/64": "int8:2000,int4/64:18000,int2/64",
    "tiers int4/64:12000,int2/64": "int4/64:12000,int2/64",
    "tiers int4/64:6000,int2/64": "int4/64:6000,int2/64",
    "tiers int4/64:6000,pq/4": "int4/64:6000,pq/4",  # product quantisation of the rare rows (compression/pq.py)
    "tiers int4/64:6000,pq/8": "int4/64:6000,pq/8",
    "pq/4 (every row)": "pq/4",
    "tiers int4/64:9000,pq/4": "int4/64:9000,pq/4",
}
TABLE_ONLY = [e for e in EMB_CHOICES if e != "tiers int4/64:9000,pq/4"]
PLANS: list[tuple[str, str]] = [  # (linears, embedding) candidates within ~15% (bytes in the JSON)
    ("int4 g64", "tiers int4/64:20000,int2/64"),
    ("int4 g64", "tiers int4/64:26000,int2/64"),
    ("int4 g64", "tiers int8:2000,int4/64:18000,int2/64"),
    ("int4 g32", "tiers int4/64:20000,int2/64"),
    ("attn int8, FFN int4 g64", "tiers int4/64:6000,int2/64"),
    ("attn int8, FFN int4 g32", "tiers int4/64:6000,int2/64"),
    ("FFN-out int8, rest int4 g64", "tiers int4/64:6000,int2/64"),
    ("FFN-in int8, rest int4 g64", "tiers int4/64:6000,int2/64"),
    ("attn int8, FFN int4 g32", "tiers int4/64:6000,pq/4"),
    ("attn int8, FFN int4 g32", "tiers int4/64:9000,pq/4"),
]
LINEARS: dict[str, Callable[[str, int | None], tuple[int, int | None]]] = {  # (role, layer) -> (bits, group)
    "int8": lambda role, layer: (8, None),
    "attn int8, FFN int4 g64": lambda role, layer: (8, None) if role in ATTN else (4, 64),
    "attn int8, FFN int4 g32": lambda role, layer: (8, None) if role in ATTN else (4, 32),
    "attn int4 g64, FFN int8": lambda role, layer: (4, 64) if role in ATTN else (8, None),
    "FFN-out int8, rest int4 g64": lambda role, layer: (8, None) if role == "ffn_out" else (4, 64),
    "FFN-in int8, rest int4 g64": lambda role, layer: (8, None) if role == "ffn_in" else (4, 64),
    "int4 g32": lambda role, layer: (4, 32),
    "int4 g64": lambda role, layer: (4, 64),
}


def build_plan(adapter: Any, linears: str, emb: str, ranking: Any, method: str = "rtn") -> Any:
    from slimformer.compression.embedding_tiers import TierSpec, parse_layout
    from slimformer.compression.plan import CompressionPlan, UnitSpec

    units = {}
    for u in adapter.units:
        if u.kind == "linear":
            bits, group = LINEARS[linears](u.role, u.layer)
            units[u.name] = UnitSpec(bits=bits, group_size=group, method=method)  # type: ignore[arg-type]
        elif emb.startswith("uniform:"):
            b, _, g = emb[len("uniform:"):].partition("/")
            units[u.name] = UnitSpec(bits=int(b), group_size=int(g) if g else None)
        else:
            units[u.name] = UnitSpec(tiers=TierSpec(parse_layout(emb), ranking))
    return CompressionPlan(units)


def fidelity(adapter: Any, evaluators: dict[str, Any], model: Any) -> dict[str, dict[str, float]]:
    return {name: {k: round(v, 5) for k, v in ev.evaluate(model).metrics.items()} for name, ev in evaluators.items()}


def onnx_fidelity(adapter: Any, model: Any, batches: dict[str, list[Any]], path: Path) -> tuple[dict[str, Any], int]:
    """Export `model` (exact kernels) and score the ONNX outputs against the fp32 torch teacher."""
    from slimformer.export import export_onnx, onnx_outputs

    info = export_onnx(adapter, model, path)
    out: dict[str, Any] = {}
    for name, bs in batches.items():
        with torch.no_grad():
            teacher = torch.cat([adapter.export_outputs(adapter.model, b)[0] for b in bs])
        got = torch.from_numpy(onnx_outputs(info.path, bs))
        out[name] = {k: round(v, 5) for k, v in adapter.fidelity_metrics(teacher, got, None).items()}
    return out, info.file_bytes


def pq_ablation(plans: list[dict[str, Any]], linears: str) -> dict[str, Any] | None:
    """The pq codec on/off at equal linears and tier boundaries: a `...,pq/4` plan and its `...,int2/64` twin."""
    rows = {p["emb"]: {k: v for k, v in p.items() if not k.startswith("_")} for p in plans if p["linears"] == linears}
    for emb, on in rows.items():
        off = rows.get(emb.replace("pq/4", "int2/64"))
        if "pq/4" in emb and off is not None:
            return {"on": on, "off": off}
    return None


def table(res: dict[str, Any]) -> str:
    pct = res["budget_percent"]
    lines = [f"MiniLM (all-MiniLM-L6-v2) at <= {pct}% of fp32 ({res['fp32_bytes'] / 1e6:.2f} MB), no recovery, "
             f"linears rounded with {res['method']} (embedding rows: nearest; pq rows: Zipf-weighted k-means "
             "codebooks); held-out fidelity on "
             f"{res['samples']} fortunes / {res['samples']} "
             "python-docs texts; bytes = accounted ONNX file (deploy onnx). Rows ranked by token frequency on the "
             "fortunes search split (600 texts, disjoint from held-out). Command: "
             "`python benchmarks/quality_15pct.py --write-recipe`.", "",
             "**Embedding table alone** (linears int8 per channel):", "",
             "| table | table MB | freed vs int4 g64 | cos fortunes | top-10 fortunes | cos python-docs | "
             "top-10 python-docs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = next(r["table_bytes"] for r in res["tables"] if r["emb"] == "int4 g64 (no tiers)")
    for r in res["tables"]:
        f, p = r["fidelity"]["fortunes"], r["fidelity"]["python-docs"]
        lines.append(f"| {r['emb']} | {r['table_bytes'] / 1e6:.2f} | {(base - r['table_bytes']) / 1e6:+.2f} | "
                     f"{f['cosine']:.4f} | {f['neighbours']:.3f} | {p['cosine']:.4f} | {p['neighbours']:.3f} |")
    lines += ["", "**Plans** (best within the budget in bold; `ONNX` rows: the exported file scored in onnxruntime):",
              "", "| linears | embedding | % of fp32 | cos fortunes | top-10 fortunes | cos python-docs | "
              "top-10 python-docs |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["plans"]:
        f, p = r["fidelity"]["fortunes"], r["fidelity"]["python-docs"]
        b = "**" if r.get("best") else ""
        lines.append(f"| {b}{r['linears']}{b} | {r['emb']} | {r['percent']:.2f} | {f['cosine']:.4f} | "
                     f"{f['neighbours']:.3f} | {p['cosine']:.4f} | {p['neighbours']:.3f} |")
    best = res.get("best")
    if best:
        f, p = best["onnx_fidelity"]["fortunes"], best["onnx_fidelity"]["python-docs"]
        lines.append(f"| {best['linears']} (ONNX file {best['onnx_file_bytes'] / 1e6:.3f} MB) | {best['emb']} | "
                     f"{100 * best['onnx_file_bytes'] / res['fp32_bytes']:.2f} | {f['cosine']:.4f} | "
                     f"{f['neighbours']:.3f} | {p['cosine']:.4f} | {p['neighbours']:.3f} |")
    ab = res.get("ablation")
    if ab:
        on_f, on_p = ab["on"]["fidelity"]["fortunes"], ab["on"]["fidelity"]["python-docs"]
        lines += ["", f"Ablation (same linears `{ab['linears']}`): tiers on {ab['on']['percent']:.2f}% "
                  f"cos {on_f['cosine']:.4f} / {on_p['cosine']:.4f}"
                  f"; tiers off (uniform int4 g64 table) {ab['off']['percent']:.2f}% cos "
                  f"{ab['off']['fidelity']['fortunes']['cosine']:.4f} / "
                  f"{ab['off']['fidelity']['python-docs']['cosine']:.4f} (fortunes / python-docs)."]
    abl = res.get("ablation_pq")
    if abl:
        pq = abl["off"]
        on_f, on_p = abl["on"]["fidelity"]["fortunes"], abl["on"]["fidelity"]["python-docs"]
        lines.append(f"Ablation of the pq codec (linears `{abl['on']['linears']}`, same tier boundaries): rare rows "
                     f"pq/4 (`{abl['on']['emb']}`) {abl['on']['percent']:.2f}% "
                     f"cos {on_f['cosine']:.4f} / {on_p['cosine']:.4f}, top-10 {on_f['neighbours']:.3f} / "
                     f"{on_p['neighbours']:.3f}; rare rows int2 g64 (`{pq['emb']}`) {pq['percent']:.2f}% cos "
                     f"{pq['fidelity']['fortunes']['cosine']:.4f} / {pq['fidelity']['python-docs']['cosine']:.4f}, "
                     f"top-10 {pq['fidelity']['fortunes']['neighbours']:.3f} / "
                     f"{pq['fidelity']['python-docs']['neighbours']:.3f}.")
    lines.append(f"\nMeasured {res['date']}, {res['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=15.0, help="percent of the fp32 bytes")
    ap.add_argument("--samples", type=int, default=256, help="held-out texts per domain")
    ap.add_argument("--write-recipe", action="store_true", help="write examples/recipes/minilm-15pct.yaml")
    ap.add_argument("--quick", action="store_true", help="32 samples, two plans (a smoke run of the script)")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                    help="rounding of the linears (gptq: Hessians from 128 texts of the fortunes search split)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_15pct.json"))
    args = ap.parse_args()

    from slimformer.api import load_model
    from slimformer.cli_profiles import update_bench_doc
    from slimformer.compression.apply import DecompositionCache, apply_plan
    from slimformer.compression.embedding_tiers import ranking_from_batches
    from slimformer.compression.memory import plan_memory, set_deploy
    from slimformer.compression.plan import CompressionPlan
    from slimformer.compression.recipe import Provenance, Recipe
    from slimformer.data import text_splits
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.export import graph_overhead_bytes

    t0 = time.time()
    samples = 32 if args.quick else args.samples
    adapter = load_model(MODEL)
    set_deploy(adapter, "onnx", graph_overhead_bytes(adapter))
    fp32 = plan_memory(adapter, CompressionPlan()).fp32_bytes
    budget = int(args.budget / 100 * fp32)
    search_texts = text_splits(600, 0)[0]  # the fortunes search split: disjoint from heldout_samples("fortunes")
    emb_unit = next(u for u in adapter.units if u.kind == "embedding")
    ranking = ranking_from_batches(adapter.make_batches(search_texts, 64), emb_unit.shape[0],
                                   "fortunes search split (600 texts)")
    batches = {d: adapter.make_batches(sorted(adapter.heldout_samples(d, samples).inputs, key=len), 32)
               for d in ("fortunes", "python-docs")}
    evs = {d: FidelityEvaluator(adapter, bs) for d, bs in batches.items()}
    cache = DecompositionCache()
    hessians = None
    if args.method == "gptq":
        from slimformer.compression.calibration import collect_hessians

        hessians = collect_hessians(adapter, adapter.make_batches(sorted(search_texts[:128], key=len), 16))

    def score(linears: str, emb: str) -> dict[str, Any]:
        plan = build_plan(adapter, linears, EMB_CHOICES[emb], ranking, args.method)
        mem = plan_memory(adapter, plan)
        model = apply_plan(adapter, plan, cache, hessians=hessians)
        row = {"linears": linears, "emb": emb, "bytes": mem.total_bytes, "percent": round(100 * mem.fraction, 3),
               "table_bytes": mem.per_unit[emb_unit.name], "fidelity": fidelity(adapter, evs, model)}
        print(json.dumps(row), flush=True)
        return row | {"_plan": plan, "_model": model}

    tables_emb = ["fp32", "int4 g64 (no tiers)", "tiers int4/64:20000,int2/64"] if args.quick else TABLE_ONLY
    tables = [score("int8", e) for e in tables_emb]
    plans = [score(lin, emb) for lin, emb in (PLANS[:1] if args.quick else PLANS)]
    feasible = [p for p in plans if p["bytes"] <= budget]
    res: dict[str, Any] = {"model": MODEL, "fp32_bytes": fp32, "budget_percent": args.budget, "budget_bytes": budget,
                           "samples": samples, "ranking": ranking.source, "method": args.method}
    if feasible:
        best = max(feasible, key=lambda p: min(p["fidelity"][d]["cosine"] for d in batches))
        best["best"] = True
        with tempfile.TemporaryDirectory() as tmp:
            onnx_fid, file_bytes = onnx_fidelity(adapter, best["_model"], batches, Path(tmp) / "best.onnx")
        res["best"] = {k: v for k, v in best.items() if not k.startswith("_")} | {
            "onnx_fidelity": onnx_fid, "onnx_file_bytes": file_bytes,
            "torch_onnx_cosine_gap": max(abs(onnx_fid[d]["cosine"] - best["fidelity"][d]["cosine"]) for d in batches)}
        off = next((p for p in plans if p["linears"] == best["linears"] and p["emb"] == "int4 g64 (no tiers)"), None)
        if off is None:
            off = score(best["linears"], "int4 g64 (no tiers)")
        res["ablation"] = {"linears": best["linears"], "on": {k: v for k, v in best.items() if not k.startswith("_")},
                           "off": {k: v for k, v in off.items() if not k.startswith("_")}}
        res["ablation_pq"] = pq_ablation(plans, best["linears"])
        if args.write_recipe:
            rec = Recipe.from_plan(best["_plan"], adapter, provenance=Provenance(
                metrics={"heldout_cosine_fortunes": best["fidelity"]["fortunes"]["cosine"],
                         "heldout_cosine_python_docs": best["fidelity"]["python-docs"]["cosine"],
                         "onnx_bytes": file_bytes}))
            path = ROOT / "examples" / "recipes" / "minilm-15pct.yaml"
            path.write_text(f"# MiniLM at <= {args.budget:g}% of fp32 (ONNX file), no recovery: "
                            "benchmarks/quality_15pct.py, docs/BENCHMARKS.md\n" + rec.to_yaml())
    res["tables"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in tables]
    res["plans"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in plans]
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if not args.quick:
        update_bench_doc("quality-15pct", table(res), ROOT / "docs" / "BENCHMARKS.md")
    print(table(res))


if __name__ == "__main__":
    main()
