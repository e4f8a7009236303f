"""Benchmark: the fused attention lowering (export/attention.py) against fp32 and onnxruntime's int8 baselines.

    python benchmarks/fused_kernels.py [--rounds 40] [--seq 128] [--batch 1] [--threads 1] [--samples 256]

MiniLM (sentence-transformers/all-MiniLM-L6-v2) plans, each exported twice: `fused` (today's export: attention
cores as com.microsoft.MultiHeadAttention, query/key/value on the int8 GEMM as one kernel) and `unfused` (what
exports were before: torch's attention decomposition, one int8 GEMM per projection):
  fp32-exact     the identity plan (the teacher's weights, exact kernels);
  int8-kernels   examples/recipes/minilm-int8-kernels.yaml (int8 GEMM on every encoder linear);
  15pct-fast     examples/recipes/minilm-15pct.yaml exported with kernels fast;
  int4-fast / int4-nbits-acc4   every encoder linear int4 g32 (RTN): DynamicQuantizeMatMul on the int4 codes
                 (kernels fast) vs MatMulNBits with accuracy_level 4 (the exact export with its MatMulNBits
                 switched to int8 compute): which int4 compute kernel is faster here;
against the baselines `slimformer bench` builds: fp32 (plain torch.onnx.export), ORT dynamic int8 per channel,
and ORT's optimised int8 (`--optimized-baseline`: eager-attention export fused by onnxruntime's transformers
optimizer, then dynamic int8 per channel). All models are timed round-robin in one process (1 thread,
batch x seq real held-out texts padded to seq, each turn run twice back to back and the second timed:
`export.bench.time_round_robin`); ratios are medians of per-round ratios. Fidelity: held-out cosine to the
fp32 teacher on fortunes and python-docs (load-independent).

Writes benchmarks/results/fused_kernels.json and the table between the `fused-kernels` markers of
docs/BENCHMARKS.md. Compressed models are cached in runs/fused-kernels/ (delete it to re-apply the recipes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RECIPES = {"int8-kernels": ("examples/recipes/minilm-int8-kernels.yaml", None),
           "15pct-fast": ("examples/recipes/minilm-15pct.yaml", "fast")}
BASES = ("fp32", "int8-dynamic-channel", "int8-optimized-channel")


def _int4_recipe(path: Path) -> Path:
    """Every encoder linear int4 g32 (RTN), embeddings fp32: the int4 compute-kernel comparison."""
    import yaml

    path.write_text(yaml.safe_dump({"slimformer_recipe": 1, "model": {"id": MODEL},
                                    "rules": [{"match": r"re:encoder\.layer\.\d+\..*",
                                               "spec": {"bits": 4, "group_size": 32}}]}))
    return path


def _accuracy_level_4(src: Path, dst: Path) -> Path:
    """The same file with every MatMulNBits computing in int8 (accuracy_level 4)."""
    proto = onnx.load(str(src))
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 4
    onnx.save(proto, str(dst))
    return dst


def build(wd: Path, samples: int, log: Any) -> dict[str, Path]:
    """Every model file to time: baselines and the plans, fused and unfused."""
    from slimformer.api import apply_recipe, load_model
    from slimformer.compression.apply import apply_plan
    from slimformer.compression.plan import CompressionPlan
    from slimformer.compression.saving import load_compressed
    from slimformer.export import export_fp32, export_onnx
    from slimformer.export.bench import optimized_int8_dynamic, quantize_int8_dynamic

    ref = load_model(MODEL)
    paths: dict[str, Path] = {"fp32": export_fp32(ref, wd / "fp32.onnx").path}
    paths["int8-dynamic-channel"] = quantize_int8_dynamic(paths["fp32"], wd / "int8-dynamic-channel.onnx", True)
    paths["int8-optimized-channel"] = optimized_int8_dynamic(ref, wd)
    identity = apply_plan(ref, CompressionPlan())
    for fused in (True, False):
        tag = "fused" if fused else "unfused"
        paths[f"fp32-exact/{tag}"] = export_onnx(ref, identity, wd / f"fp32-exact-{tag}.onnx", fused=fused,
                                                 fuse_projections=fused).path
    recipes = {**{k: (ROOT / v[0], v[1]) for k, v in RECIPES.items()}, "int4": (_int4_recipe(wd / "int4.yaml"), None)}
    for name, (recipe, kernels) in recipes.items():
        out = wd / f"model-{name}"
        if not (out / "recipe.yaml").is_file():
            log(f"applying {recipe.name}")
            apply_recipe(recipe, MODEL, out_dir=out, samples=samples)
        comp = load_compressed(out)
        cal = comp.make_batches(comp.calibration_samples("fortunes", 64), 32)
        modes = {"int4": [("int4-fast", "fast"), ("int4-exact", "exact")]}.get(name, [(name, kernels)])
        for label, mode in modes:
            for fused in (True, False):
                tag = "fused" if fused else "unfused"
                log(f"exporting {label}/{tag}")
                p = export_onnx(comp, comp.model, wd / f"{label}-{tag}.onnx", kernels=mode,  # type: ignore[arg-type]
                                calibration=cal if mode == "fast" else None, fused=fused,
                                fuse_projections=fused).path
                if label == "int4-exact":
                    label_4, p = "int4-nbits-acc4", _accuracy_level_4(p, wd / f"int4-nbits-acc4-{tag}.onnx")
                    paths[f"{label_4}/{tag}"] = p
                else:
                    paths[f"{label}/{tag}"] = p
    return paths


def fidelity(paths: dict[str, Path], samples: int) -> dict[str, dict[str, float]]:
    """Held-out cosine of each file's sentence embedding to the fp32 ONNX teacher's, on two text domains."""
    from slimformer.api import load_model
    from slimformer.export import onnx_outputs

    ref = load_model(MODEL)
    out: dict[str, dict[str, float]] = {n: {} for n in paths}
    for data in ("fortunes", "python-docs"):
        held = ref.heldout_samples(data, samples)
        batches = ref.make_batches(held.inputs, 32)
        teacher = onnx_outputs(paths["fp32"], batches, threads=1)
        for n, p in paths.items():
            o = onnx_outputs(p, batches, threads=1)
            a = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
            b = o / np.linalg.norm(o, axis=1, keepdims=True)
            out[n][data] = round(float((a * b).sum(1).mean()), 5)
    return out


def timing(paths: dict[str, Path], rounds: int, batch: int, seq: int, threads: int) -> dict[str, Any]:
    """ms per run (median) and medians of per-round ratios to each baseline, round-robin in one process."""
    from slimformer.api import load_model
    from slimformer.export import session
    from slimformer.export.bench import Spread, fixed_length_feed, heldout_samples, time_round_robin

    ref = load_model(MODEL)
    x, _ = heldout_samples(ref, "fortunes", 64)
    feed = fixed_length_feed(ref, x, batch, seq)
    sessions = {n: session(p, threads) for n, p in paths.items()}
    t = {n: np.asarray(v) for n, v in time_round_robin(sessions, feed, rounds, 3, repeat=2).items()}
    return {n: {"ms": round(float(np.median(v)), 3),
                **{f"x {b}": round(Spread.of(v / t[b]).median, 3) for b in BASES},
                **({"x unfused": round(Spread.of(v / t[n.replace("/fused", "/unfused")]).median, 3)}
                   if n.endswith("/fused") else {})}
            for n, v in t.items()}


def update_docs(r: dict[str, Any]) -> None:
    """The table between the fused-kernels markers of docs/BENCHMARKS.md (appended when absent)."""
    load = r["loadavg_at_start"]
    note = " (a loaded machine: ratios are indicative only)" if load[0] > 0.5 * r["cpus"] else ""
    lines = ["<!-- fused-kernels:begin -->",
             f"Measured {r['created']} with `{r['command']}`: {r['rounds']} interleaved rounds, {r['threads']} "
             f"thread(s), batch {r['batch']} x {r['seq']} tokens, {r['cpu']}, onnxruntime {r['onnxruntime']}, load "
             f"average {', '.join(f'{x:.2f}' for x in load)} at the start{note}. Ratios: medians of per-round "
             "ratios. Cosine: held-out, to the fp32 ONNX teacher.", "",
             "| model | ms | x fp32 | x ORT int8/channel | x ORT optimised int8 | fused / unfused | cosine fortunes "
             "| cosine python-docs |", "|---" * 8 + "|"]
    for n, t in r["timing"].items():
        f = r["fidelity"][n]
        lines.append(f"| {n} | {t['ms']:.2f} | {t['x fp32']:.3f} | {t['x int8-dynamic-channel']:.3f} | "
                     f"{t['x int8-optimized-channel']:.3f} | {t.get('x unfused', '—')} | {f['fortunes']:.4f} | "
                     f"{f['python-docs']:.4f} |")
    lines.append("<!-- fused-kernels:end -->")
    doc = ROOT / "docs" / "BENCHMARKS.md"
    text = doc.read_text()
    begin, end = "<!-- fused-kernels:begin -->", "<!-- fused-kernels:end -->"
    if begin not in text:
        text += ("\n## Fused attention lowering (benchmarks/fused_kernels.py)\n\n"
                 f"{begin}\n{end}\n")
    a, z = text.index(begin), text.index(end)
    doc.write_text(text[:a] + "\n".join(lines) + text[z + len(end):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=256, help="held-out texts per domain for the cosine columns")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "fused-kernels")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only")
    args = ap.parse_args()
    import onnxruntime as ort

    from slimformer.export.bench import cpu_model

    t0 = time.time()
    load = list(os.getloadavg())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[fused_kernels] {m}", flush=True)  # noqa: E731
    paths = build(args.work_dir, args.samples, log)
    log("fidelity")
    fid = fidelity(paths, args.samples)
    log(f"timing {len(paths)} models x {args.rounds} rounds")
    tim = timing(paths, args.rounds, args.batch, args.seq, args.threads)
    r = {"created": time.strftime("%Y-%m-%d"), "command": "python benchmarks/fused_kernels.py "
         f"--rounds {args.rounds} --seq {args.seq} --batch {args.batch} --threads {args.threads}",
         "rounds": args.rounds, "seq": args.seq, "batch": args.batch, "threads": args.threads, "cpu": cpu_model(),
         "cpus": os.cpu_count() or 1, "onnxruntime": ort.__version__, "loadavg_at_start": load,
         "loadavg_at_end": list(os.getloadavg()), "seconds": round(time.time() - t0, 1),
         "files": {n: str(p) for n, p in paths.items()}, "fidelity": fid, "timing": tim}
    out = ROOT / "benchmarks" / "results" / "fused_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    if not args.no_docs:
        update_docs(r)
    for n, t in tim.items():
        print(f"{n:34s} {t['ms']:7.2f} ms  x fp32 {t['x fp32']:.3f}  x int8/ch {t['x int8-dynamic-channel']:.3f}  "
              f"x opt-int8 {t['x int8-optimized-channel']:.3f}  {t.get('x unfused', '')}  cos {fid[n]}")
    log(f"wrote {out} in {r['seconds']} s")


if __name__ == "__main__":
    main()
