"""Benchmark: a ViT trained from scratch on Fashion-MNIST, then a slimformer search on it.

    python benchmarks/vit_fashion_mnist.py [--teacher-dir runs/vit-fmnist-teacher] [--epochs 3]
        [--threads N] [--trials 40] [--run-dir runs/bench-vit-fmnist] [--retrain]

1. Trains the teacher (benchmarks/train_vit.py: a 4-block, width-96 timm ViT on 28x28 images,
   16 patch tokens) into --teacher-dir, on the full 60,000-image Fashion-MNIST when Debian's
   dataset-fashion-mnist is installed, else on the packaged 2,000-image sample. Skipped when the
   directory already holds a train_info.json (pass --retrain to train again).
2. Runs a search on it (fresh run directory): per-layer bits [8, 4], group size [32, 96], rounding
   [rtn, gptq], rank fraction [1.0, 0.5] for qkv/attn_out and ffn_in/ffn_out, heads kept [4, 3, 2], a 25%
   memory budget, 40 trials,
   agreement with the teacher as the quality objective; search images are packaged training images,
   held-out images the 1,000 packaged test images.
3. Prints held-out agreement/accuracy of the best recipe vs the best uniform baseline and writes
   benchmarks/results/vit_fashion_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from slimformer.export.bench import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = ROOT / "benchmarks" / "results" / "vit_fashion_mnist.json"



def search_config(teacher_dir: Path, run_dir: Path, trials: int, threads: int | None) -> Any:
    from slimformer.search import SearchConfig

    return SearchConfig.model_validate({
        "model": str(teacher_dir),
        "data": {"source": "fashion-mnist", "search_samples": 512, "heldout_samples": 1000,
                 "calibration_samples": 128, "batch_size": 256},
        "space": {"per_layer": True, "groups": [
            # heads_kept lists "keep all" first: the uniform start points fill every dimension they do not
            # set with its first choice, so [2, 3, 4] would start the search from half-pruned plans
            {"select": {"role": ["qkv", "attn_out"]}, "bits": [8, 4], "group_size": [32, 96],
             "method": ["rtn", "gptq"], "rank_fraction": [1.0, 0.5], "heads_kept": [4, 3, 2]},
            {"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4], "group_size": [32, 96],
             "method": ["rtn", "gptq"], "rank_fraction": [1.0, 0.5]},
        ]},
        "budget": {"memory": "25%"},
        "objectives": ["quality", "latency", "memory"],
        "quality_metric": "agreement",
        "sampler": {"name": "nsga2", "population_size": 10, "seed": 0},
        "trials": trials,
        "run_dir": str(run_dir),
        "study_name": "vit-fmnist",
        "latency": {"batch": 1, "seq": 17},  # 16 patch tokens + the class token
        "threads": threads,
    })


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-dir", type=Path, default=Path("runs/vit-fmnist-teacher"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-vit-fmnist"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training and search")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--retrain", action="store_true", help="train the teacher even if it exists")
    ap.add_argument("--out", type=Path, default=RESULT_FILE)
    args = ap.parse_args()

    import optuna
    import timm
    import torch
    from train_vit import TRAIN_INFO, train_fashion_mnist_vit  # benchmarks/train_vit.py, next to this script

    from slimformer.search import run_search
    from slimformer.search.results import BestBaseline, BestRecipe

    t_start = time.perf_counter()
    info_file = args.teacher_dir / TRAIN_INFO
    trained_now = args.retrain or not info_file.exists()
    if trained_now:
        train_fashion_mnist_vit(args.teacher_dir, epochs=args.epochs, threads=args.threads, log=print)
    else:
        print(f"teacher: reusing {args.teacher_dir} (pass --retrain to train again)")
    teacher = json.loads(info_file.read_text())
    acc = teacher["full_test_accuracy"] if teacher["full_test_accuracy"] is not None \
        else teacher["packaged_test_accuracy"]
    print(f"teacher: {teacher['parameters'] / 1e6:.3f} M parameters, {teacher['epochs']} epoch(s) on "
          f"{teacher['train_size']} images ({teacher['data_source']}), test accuracy {acc:.4f}, "
          f"train {teacher['train_seconds']:.0f} s (epochs {teacher['epoch_seconds']} s, "
          f"{teacher['threads']} thread(s))")

    if args.run_dir.exists():
        shutil.rmtree(args.run_dir)
    cfg = search_config(args.teacher_dir, args.run_dir, args.trials, args.threads)
    t0 = time.perf_counter()
    res = run_search(cfg, progress=False, log=print)
    search_wall = time.perf_counter() - t0
    s = res.summary
    m = s.quality_metric
    study = optuna.load_study(study_name=cfg.study_name, storage=res.storage)
    states = s.trial_states
    pareto = json.loads((args.run_dir / "pareto.json").read_text())
    baselines = json.loads((args.run_dir / "baselines.json").read_text())
    best, base = s.best_recipe, s.best_baseline

    def held(entry: BestRecipe | BestBaseline | None, key: str) -> float | None:
        return None if entry is None else entry.heldout_metrics.get(key)

    result = {
        "benchmark": "vit_fashion_mnist",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "timm": timm.__version__, "optuna": optuna.__version__, "python": platform.python_version()},
        "teacher": {"dir": str(args.teacher_dir), "trained_in_this_run": trained_now, **teacher},
        "search": {
            "run_dir": str(args.run_dir),
            "config": cfg.model_dump(mode="json"),
            "trials": len(study.trials),
            "trial_states": states,
            "infeasible_trials": s.infeasible_trials,
            "wall_s": round(search_wall, 1),
            "mean_trial_s": s.mean_trial_s,
            "budget_percent": s.budget_percent,
            "fp32_bytes": s.fp32_bytes,
            "pareto_size": len(pareto["trials"]),
        },
        "best_recipe": None if best is None else best.to_json(m),
        "best_baseline": None if base is None else base.to_json(m),
        "heldout_delta": None if best is None or base is None else {
            k: held(best, k) - held(base, k) for k in ("agreement", "accuracy", "neg_kl")
            if held(best, k) is not None and held(base, k) is not None},
        "baselines": baselines,
        "pareto": [{"trial": e["trial"], "memory_percent": e["memory_percent"],
                    "latency_ms_estimate": e["latency_ms_estimate"], "search_metrics": e["search_metrics"],
                    "heldout_metrics": e["heldout_metrics"], "plan": e["plan"]} for e in pareto["trials"]],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(args.out)

    print(f"search: {len(study.trials)} trials {states}, {s.infeasible_trials} over budget, "
          f"{search_wall:.0f} s, budget {s.budget_percent:.1f}% of fp32")
    ta = held(best, "teacher_accuracy") or held(base, "teacher_accuracy")
    if ta is not None:
        print(f"teacher held-out accuracy (1,000 packaged test images): {ta:.4f}")
    if best is not None:
        print(f"best recipe  trial {best['trial']}: {best['memory_percent']:.2f}% of fp32, held-out "
              f"{m} {held(best, m):.4f}, accuracy {held(best, 'accuracy'):.4f}")
    if base is not None:
        print(f"best uniform {base['name']}: {base['memory_percent']:.2f}% of fp32, held-out "
              f"{m} {held(base, m):.4f}, accuracy {held(base, 'accuracy'):.4f}")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
