"""Structured pruning without retraining: weight-norm vs calibration-data importance, with and without the
least-squares re-fit of the following projection (compression/structure.py), on the real all-MiniLM-L6-v2.

    python benchmarks/structured_pruning.py [--calibration 64,256] [--heldout 256] [--threads 1] [--no-doc]

Cuts, in every one of the 6 layers: 25% / 50% of the 1536 FFN neurons (1152 / 768 kept) and 25% / 50% of
the 12 heads (9 / 6 kept); each with importance weight|activation and refit off|on; plus the 25% FFN cut
with int4 GPTQ g128 on every linear (the re-fitted matrix quantised with the kept inputs' Hessian).

Data, as the search draws it: held-out = the 256 held-out fortunes texts `slimformer apply` measures on
(`text_splits(0, 256)[1]`); calibration = the first `--calibration` texts of the search split, for each
count given (64 is the search's default `data.calibration_samples`), disjoint from the held-out texts
(asserted). A second domain for the held-out side only: the first paragraphs (40-400 characters) of the
docstrings of a fixed list of Python standard-library modules, which no calibration text resembles (does a
fit on fortunes generalise?).
Quality = mean cosine of the pooled embeddings to the uncompressed model's, and top-10 neighbour agreement.
Quality numbers, not timings: machine load does not matter. Writes benchmarks/results/structured_pruning.json
and the table between the `structured-pruning` markers of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
RESULT_FILE = REPO / "benchmarks" / "results" / "structured_pruning.json"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DOC_MODULES = ("os", "os.path", "shutil", "json", "re", "collections", "itertools", "functools", "pathlib",
               "subprocess", "socket", "threading", "random", "statistics", "string", "textwrap", "datetime",
               "calendar", "decimal", "fractions", "math", "heapq", "bisect", "csv", "zipfile", "tarfile",
               "gzip", "hashlib", "logging", "argparse", "unittest", "inspect", "typing", "email", "urllib.parse",
               "http.client", "sqlite3", "tempfile", "glob", "fnmatch", "difflib", "pprint", "enum", "dataclasses")


def docstring_texts(n: int) -> list[str]:
    """First paragraphs of stdlib docstrings (40-400 characters, de-duplicated), the first n by a stable order."""
    import importlib

    seen: dict[str, None] = {}
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(para) <= 400 and any(c.isalpha() for c in para):
                seen.setdefault(para, None)
    texts = list(seen)
    return texts[:: max(1, len(texts) // n)][:n]


def cuts(n_layers: int) -> list[tuple[str, Any]]:
    from slimformer.compression.plan import LayerSpec

    return [("FFN -25% (1152 of 1536 neurons)", {i: LayerSpec(neurons_kept=1152) for i in range(n_layers)}),
            ("FFN -50% (768 of 1536 neurons)", {i: LayerSpec(neurons_kept=768) for i in range(n_layers)}),
            ("heads -25% (9 of 12)", {i: LayerSpec(heads_kept=9) for i in range(n_layers)}),
            ("heads -50% (6 of 12)", {i: LayerSpec(heads_kept=6) for i in range(n_layers)})]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimformer.compression.apply import DecompositionCache, apply_plan
    from slimformer.compression.calibration import collect_hessians, collect_structure_stats
    from slimformer.compression.memory import plan_memory
    from slimformer.compression.plan import CompressionPlan, StructureSpec, UnitSpec
    from slimformer.data import text_splits
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.models import load
    from slimformer.threads import set_threads

    set_threads(args.threads)
    adapter = load(MODEL)
    sizes = [int(n) for n in args.calibration.split(",")]
    search, _ = text_splits(max(*sizes, 256), args.heldout)
    heldout = text_splits(0, args.heldout)[1]
    assert not set(search) & set(heldout), "calibration and held-out texts overlap"
    t0 = time.perf_counter()
    docs = docstring_texts(args.heldout)
    evals = {"fortunes": FidelityEvaluator(adapter, adapter.make_batches(sorted(heldout, key=len), 32)),
             "docstrings": FidelityEvaluator(adapter, adapter.make_batches(sorted(docs, key=len), 32))}
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    modes = [StructureSpec(imp, refit) for imp in ("weight", "activation") for refit in (False, True)]
    int4 = {u.name: UnitSpec(bits=4, group_size=128, method="gptq") for u in adapter.units if u.kind == "linear"}
    grid = [(name, layers, {}) for name, layers in cuts(len(adapter.layers))]
    grid.append(("FFN -25% + int4 GPTQ g128 linears", cuts(len(adapter.layers))[0][1], int4))
    rows: list[dict[str, Any]] = []
    for n_cal in sizes:
        cal = adapter.make_batches(sorted(search[:n_cal], key=len), 32)
        stats, hessians = collect_structure_stats(adapter, cal), collect_hessians(adapter, cal)
        cache = DecompositionCache()
        for name, layers, units in grid:
            for mode in modes:
                plan = CompressionPlan(units, layers, structure=mode)
                row = {"cut": name, "importance": mode.importance, "refit": mode.refit, "calibration": n_cal,
                       "memory_percent": round(100 * plan_memory(adapter, plan).total_bytes / fp32, 2)}
                same = [r for r in rows if not (mode.needs_data or units)
                        and (r["cut"], r["importance"], r["refit"]) == (name, mode.importance, mode.refit)]
                if same:  # no calibration data involved: the model is the same as with the first size
                    rows.append({**same[0], "calibration": n_cal})
                    continue
                model = apply_plan(adapter, plan, cache, hessians=hessians, structure_stats=stats)
                for dom, ev in evals.items():
                    m = ev.evaluate(model).metrics
                    row[dom] = {"cosine": round(m["cosine"], 4), "neighbours": round(m["neighbours"], 4)}
                rows.append(row)
                print(f"cal {n_cal:4d} {name:38s} {mode.importance:10s} refit={int(mode.refit)}  fortunes "
                      f"{row['fortunes']['cosine']:.4f}  docstrings {row['docstrings']['cosine']:.4f}", flush=True)
    return {"model": MODEL, "calibration_texts": sizes, "heldout_texts": len(heldout),
            "docstring_texts": len(docs), "python": platform.python_version(),
            "seconds": round(time.perf_counter() - t0),
            "command": "python benchmarks/structured_pruning.py " + " ".join(sys.argv[1:]), "rows": rows}


def table(res: dict[str, Any]) -> str:
    sizes = res["calibration_texts"]
    head = " | ".join(f"fortunes, cal {n} | docstrings, cal {n}" for n in sizes)
    lines = [f"all-MiniLM-L6-v2, every layer cut alike; calibration: the first {' / '.join(map(str, sizes))} "
             f"search-split fortunes; held-out mean cosine to the uncompressed model (top-10 neighbour agreement in "
             f"brackets) on {res['heldout_texts']} held-out fortunes and {res['docstring_texts']} Python docstrings "
             f"(a second domain, never calibrated on). `{res['command'].strip()}`", "",
             f"| cut | % of fp32 | importance | re-fit | {head} |", "|---|---:|---|---|" + "---:|" * (2 * len(sizes))]
    first = [r for r in res["rows"] if r["calibration"] == sizes[0]]
    for r in first:
        cells = []
        for n in sizes:
            s = next(x for x in res["rows"] if x["calibration"] == n
                     and (x["cut"], x["importance"], x["refit"]) == (r["cut"], r["importance"], r["refit"]))
            cells += [f"{s[d]['cosine']:.4f} ({s[d]['neighbours']:.3f})" for d in ("fortunes", "docstrings")]
        lines.append(f"| {r['cut']} | {r['memory_percent']:.1f} | {r['importance']} | {'yes' if r['refit'] else 'no'} "
                     f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", default="64,256", help="calibration text counts from the search split")
    p.add_argument("--heldout", type=int, default=256, help="held-out texts per domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULT_FILE)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the docs/BENCHMARKS.md section")
    args = p.parse_args()
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    body = table(res)
    print(body)
    if not args.no_doc:
        from slimformer.cli_profiles import update_bench_doc

        update_bench_doc("structured-pruning", body, REPO / "docs" / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
