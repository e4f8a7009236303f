"""Rounding methods against GPTQ on the same plans and data (issue 15 item 4), on the real all-MiniLM-L6-v2.

    python benchmarks/rounding.py [--calibration 128] [--heldout 256] [--plans int4-g128,int4-g64,int3-g64,int2-ffn]
                                  [--methods rtn,gptq,gptq-ao,recon,awq,awq+gptq] [--threads 1] [--no-doc]

Plans (every layer alike; the word-embedding table at int4 with round-to-nearest in all of them, so rows
differ only in how the linears are rounded):
  int4-g128  every linear int4, groups of 128        int4-g64  every linear int4, groups of 64
  int3-g64   every linear 3-bit, groups of 64         int2-ffn  FFN input 2-bit g64, other linears int4 g64
Methods (the plan's `method` for the linears): rtn, gptq (the reference), gptq-ao (act-order + damping search),
recon (gptq-ao codes + least-squares scales on the calibration outputs, compression/reconstruct.py), and the
AWQ-style channel scaling of compression/awq.py on top of round-to-nearest (awq) or of GPTQ (awq+gptq). The AWQ rows
are an upper bound (the 1/s per input channel is applied as if folded for free; deployable only for the
attention output, see compression/awq.py).

Data: calibration = the first `--calibration` texts of the fortunes search split (`text_splits`), the held-out
sets never overlap it (asserted): the last `--heldout` fortunes (`text_splits(0, n)[1]`, what `apply` scores)
and the last `--heldout` paragraphs of the packaged `python-docs` (a second domain, never calibrated on).
Quality = mean cosine of the pooled embeddings to the uncompressed model's and top-10 neighbour agreement.
Quality numbers do not depend on machine load; the seconds column (time to apply the plan) does.
Writes benchmarks/results/rounding.json and the table between the `rounding` markers of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
RESULT_FILE = REPO / "benchmarks" / "results" / "rounding.json"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PLANS = ("int4-g128", "int4-g64", "int3-g64", "int2-ffn")
METHODS = ("rtn", "gptq", "gptq-ao", "recon", "awq", "awq+gptq")


def plan_for(adapter: Any, name: str, method: str) -> Any:
    """The named plan with `method` for its linears (AWQ rows start from round-to-nearest)."""
    from slimformer.compression.plan import CompressionPlan, UnitSpec

    m = "rtn" if method.startswith("awq") else method
    units = {}
    for u in adapter.units:
        if u.kind != "linear":
            units[u.name] = UnitSpec(bits=4, group_size=128 if name == "int4-g128" else 64)
        elif name == "int4-g128":
            units[u.name] = UnitSpec(bits=4, group_size=128, method=m)
        elif name == "int4-g64":
            units[u.name] = UnitSpec(bits=4, group_size=64, method=m)
        elif name == "int3-g64":
            units[u.name] = UnitSpec(bits=3, group_size=64, method=m)
        elif name == "int2-ffn":
            units[u.name] = UnitSpec(bits=2 if u.role == "ffn_in" else 4, group_size=64, method=m)
        else:
            raise SystemExit(f"error: unknown plan {name!r}; choose from {', '.join(PLANS)}")
    return CompressionPlan(units)


def apply_awq(adapter: Any, model: Any, plan: Any, hessians: dict[str, Any], gptq: bool) -> None:
    """Overwrite each linear's weight with its AWQ effective weight (the upper bound: 1/s folded for free)."""
    import torch

    from slimformer.compression.awq import ALPHAS, awq_quantize, effective_weight

    for u in adapter.units:
        spec = plan.unit(u.name)
        if u.kind != "linear" or not spec.quantized:
            continue
        mod = model.get_submodule(u.name)
        w = adapter.model.get_submodule(u.name).weight.detach()
        alphas = (0.0, 0.25, 0.5, 0.75, 1.0) if gptq else ALPHAS  # a coarser grid where each try is a GPTQ run
        q, s = awq_quantize(w, hessians[u.name], spec.bits, spec.group_size, gptq=gptq, alphas=alphas)
        with torch.no_grad():
            mod.weight.copy_(effective_weight(q, s))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimformer.compression.apply import DecompositionCache, apply_plan
    from slimformer.compression.calibration import collect_hessians
    from slimformer.compression.memory import plan_memory
    from slimformer.compression.plan import CompressionPlan
    from slimformer.data import load_texts, text_splits
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.models import load
    from slimformer.threads import set_threads

    set_threads(args.threads)
    adapter = load(MODEL)
    search, heldout = text_splits(args.calibration, args.heldout)
    cal_texts = search[: args.calibration]
    docs = load_texts("python-docs")[-args.heldout:]
    assert not set(cal_texts) & (set(heldout) | set(docs)), "calibration and held-out texts overlap"
    t0 = time.perf_counter()
    evals = {"fortunes": FidelityEvaluator(adapter, adapter.make_batches(sorted(heldout, key=len), 32)),
             "python-docs": FidelityEvaluator(adapter, adapter.make_batches(sorted(docs, key=len), 32))}
    hessians = collect_hessians(adapter, adapter.make_batches(sorted(cal_texts, key=len), 32))
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    cache = DecompositionCache()
    rows: list[dict[str, Any]] = []
    for name in args.plans.split(","):
        for method in args.methods.split(","):
            if method not in METHODS:
                raise SystemExit(f"error: unknown method {method!r}; choose from {', '.join(METHODS)}")
            plan = plan_for(adapter, name, method)
            t = time.perf_counter()
            model = apply_plan(adapter, plan, cache, hessians=hessians)
            if method.startswith("awq"):
                apply_awq(adapter, model, plan, hessians, gptq=method == "awq+gptq")
            row: dict[str, Any] = {"plan": name, "method": method, "seconds": round(time.perf_counter() - t, 1),
                                   "memory_percent": round(100 * plan_memory(adapter, plan).total_bytes / fp32, 2)}
            for dom, ev in evals.items():
                m = ev.evaluate(model).metrics
                row[dom] = {"cosine": round(m["cosine"], 4), "neighbours": round(m["neighbours"], 4)}
            rows.append(row)
            if args.partial is not None:  # every finished row survives an interrupted run
                args.partial.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            print(f"{name:10s} {method:9s} {row['memory_percent']:5.2f}%  fortunes {row['fortunes']['cosine']:.4f} "
                  f"({row['fortunes']['neighbours']:.3f})  python-docs {row['python-docs']['cosine']:.4f} "
                  f"({row['python-docs']['neighbours']:.3f})  {row['seconds']}s", flush=True)
    return {"model": MODEL, "calibration_texts": args.calibration, "heldout_texts": len(heldout),
            "python_docs_texts": len(docs), "python": platform.python_version(),
            "seconds": round(time.perf_counter() - t0),
            "command": "python benchmarks/rounding.py " + " ".join(sys.argv[1:]), "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = [f"all-MiniLM-L6-v2, every layer alike, word embeddings int4 round-to-nearest in every row; calibration: "
             f"the first {res['calibration_texts']} search-split fortunes; held-out mean cosine to the uncompressed "
             f"model (top-10 neighbour agreement in brackets) on {res['heldout_texts']} held-out fortunes and "
             f"{res['python_docs_texts']} `python-docs` paragraphs (never calibrated on). awq rows: upper bound "
             f"(channel scales folded for free). Seconds: applying the plan on a loaded 2-core machine. "
             f"`{res['command'].strip()}`", "",
             "| plan | % of fp32 | method | fortunes | python-docs | Δ cosine vs gptq (fortunes / docs) | seconds |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        ref = next((x for x in res["rows"] if x["plan"] == r["plan"] and x["method"] == "gptq"), None)
        delta = "" if ref is None else " / ".join(
            f"{r[d]['cosine'] - ref[d]['cosine']:+.4f}" for d in ("fortunes", "python-docs"))
        cells = [f"{r[d]['cosine']:.4f} ({r[d]['neighbours']:.3f})" for d in ("fortunes", "python-docs")]
        lines.append(f"| {r['plan']} | {r['memory_percent']:.1f} | {r['method']} | {' | '.join(cells)} | {delta} "
                     f"| {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=int, default=128, help="calibration texts from the fortunes search split")
    p.add_argument("--heldout", type=int, default=256, help="held-out texts per domain")
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULT_FILE)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the docs/BENCHMARKS.md section")
    p.add_argument("--partial", type=Path, default=None, help="rewrite this JSON file after every row")
    p.add_argument("--merge", default="", help="comma-separated result files of earlier runs (e.g. plans run in "
                   "parallel): their rows are joined into --out and the table instead of running anything")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        res = {**parts[0], "rows": [r for part in parts for r in part["rows"]],
               "seconds": sum(part["seconds"] for part in parts),
               "command": "; ".join(part["command"] for part in parts)}
    else:
        res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    body = table(res)
    print(body)
    if not args.no_doc:
        from slimformer.cli_profiles import update_bench_doc

        update_bench_doc("rounding", body, REPO / "docs" / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
