"""Benchmark: the calibrated latency model against measured held-out plans, and its prediction speed.

    python benchmarks/latency_model.py [--profile amd-epyc-avx512-1t-ort1-32] [--configs 60] [--vit-configs 60]
                                       [--runs 25]

Runs `slimformer profile validate` for all-MiniLM-L6-v2 (batch 1 x seq 128) and the Fashion-MNIST ViT
geometry (`vit-fmnist`, batch 1 x 17 tokens): each exports the random held-out plans and the uniform
baselines, times them round-robin on this thread's CPU clock (1 intra-op thread), and writes the
profile's validation section, benchmarks/results/profile-validate-*.json and its docs/BENCHMARKS.md
section (the exports stay in runs/validate-minilm and runs/validate-vit for the next run). Then times
`predict` (CPU ms per plan over 500 random MiniLM plans) and writes benchmarks/results/latency_model_speed.json
and the `latency-model-speed` section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = "amd-epyc-avx512-1t-ort1-32"


def prediction_speed(profile: str, n: int = 500) -> dict:
    """CPU ms per `predict` call (and per roofline estimate) over `n` random MiniLM plans."""
    from slimformer.hardware_profiles import load_profile
    from slimformer.hardware_profiles.predict import predict
    from slimformer.hardware_profiles.references import MINILM, reference_adapter
    from slimformer.hardware_profiles.roofline import estimate_latency
    from slimformer.hardware_profiles.validate import random_plan

    prof = load_profile(profile)
    ad = reference_adapter(MINILM)
    rng = random.Random(1)
    plans = [random_plan(ad, rng)[0] for _ in range(n)]
    predict(ad, plans[0], 1, 128, prof)
    t0 = time.thread_time()
    for p in plans:
        predict(ad, p, 1, 128, prof)
    pred_ms = (time.thread_time() - t0) / n * 1e3
    t0 = time.thread_time()
    for p in plans:
        estimate_latency(ad.units, ad.layers, p, prof, 1, 128)
    est_ms = (time.thread_time() - t0) / n * 1e3
    return {"profile": profile, "plans": n, "predict_cpu_ms_per_plan": round(pred_ms, 4),
            "estimate_cpu_ms_per_plan": round(est_ms, 4), "loadavg": [round(x, 2) for x in os.getloadavg()]}


MODELS = (("sentence-transformers/all-MiniLM-L6-v2", "MiniLM 1x128", 1, 128), ("vit-fmnist", "ViT 1x17", 1, 17))


def compare(profile: str, others: list[str]) -> list[dict]:
    """Every profile's metrics on the plans measured by the last validation of `profile` (same rows, so the
    machine's state at measurement time is the same for all; plans regenerated from the validation's seed 0)."""
    import numpy as np

    from slimformer.hardware_profiles import load_profile
    from slimformer.hardware_profiles.predict import predict
    from slimformer.hardware_profiles.references import reference_adapter
    from slimformer.hardware_profiles.validate import drew_kernels, metrics, results_stem, validation_plans

    out = []
    shipped = load_profile(profile).name
    for model, label, batch, seq in MODELS:
        rows = [r for r in json.loads((ROOT / "benchmarks/results" / f"{results_stem(shipped, model)}.json")
                                      .read_text())["rows"] if r["held_out"]]
        adapter = reference_adapter(model)
        plans, _ = validation_plans(adapter, len(rows), kernels=drew_kernels([r.get("description", "") for r in rows]))
        measured = np.array([r["measured_ms"] for r in rows])
        for name in (profile, *others):
            prof = load_profile(name)
            pred = np.array([predict(adapter, plans[r["name"]], batch, seq, prof).ms for r in rows])
            m = metrics(measured, pred)
            out.append({"model": label, "profile": name, "version": prof.version, "plans": len(rows),
                        "calibration_s": prof.calibration.seconds if prof.calibration else None,
                        **{k: round(v, 4) for k, v in m.items()},
                        "bias": round(float(np.mean((pred - measured) / measured)), 4)})
    return out


def compare_doc(table: list[dict]) -> str:
    lines = ["| model | profile | version | plans | MAPE | within ±10% | within ±5% | p95 | Kendall tau | mean bias |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['model']} | `{Path(r['profile']).name}` | {r['version']} | {r['plans']} | "
                     f"{100 * r['mape']:.2f}% | {100 * r['within_10']:.0f}% | {100 * r['within_5']:.0f}% | "
                     f"{100 * r['p95_error']:.1f}% | {r['kendall_tau']:.3f} | {100 * r['bias']:+.1f}% |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=DEFAULT_PROFILE)
    ap.add_argument("--configs", type=int, default=60)
    ap.add_argument("--vit-configs", type=int, default=60)
    ap.add_argument("--runs", type=int, default=25, help="timed rounds per pass (the noise floor falls with more)")
    ap.add_argument("--skip-validate", action="store_true", help="Only time the predictions.")
    ap.add_argument("--compare", nargs="+", default=[], metavar="PROFILE",
                    help="also score these profiles on the same measured plans (e.g. a fresh calibration)")
    args = ap.parse_args()
    os.chdir(ROOT)
    if not args.skip_validate:
        for model, n, work in (("sentence-transformers/all-MiniLM-L6-v2", args.configs, "runs/validate-minilm"),
                               ("vit-fmnist", args.vit_configs, "runs/validate-vit")):
            # the exports are kept (and reused when the plans are the same) in a gitignored folder
            subprocess.run([sys.executable, "-m", "slimformer.cli", "profile", "validate", args.profile, "--model",
                            model, "--configs", str(n), "--runs", str(args.runs), "--work-dir", work, "--write"],
                           check=True)
    from slimformer.cli_profiles import update_bench_doc
    from slimformer.fileio import atomic_write

    if args.compare:
        table = compare(args.profile, args.compare)
        atomic_write(ROOT / "benchmarks/results/latency_model_compare.json", json.dumps(table, indent=1))
        update_bench_doc("latency-model-compare", compare_doc(table), ROOT / "docs/BENCHMARKS.md")
    speed = prediction_speed(args.profile)
    atomic_write(ROOT / "benchmarks/results/latency_model_speed.json", json.dumps(speed, indent=1))
    update_bench_doc("latency-model-speed", (
        f"`python benchmarks/latency_model.py --skip-validate`: `predict` takes "
        f"**{speed['predict_cpu_ms_per_plan']:.3f} ms** of CPU per MiniLM plan (batch 1 x 128; mean over "
        f"{speed['plans']} random plans; the roofline estimate takes {speed['estimate_cpu_ms_per_plan']:.3f} ms); "
        f"load average {speed['loadavg']}."), ROOT / "docs/BENCHMARKS.md")
    print(json.dumps(speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
