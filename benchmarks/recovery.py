"""Knowledge-distillation recovery: held-out fidelity before and after, at <= 12.5% of the fp32 bytes.

    python benchmarks/recovery.py [--minutes 15] [--plan-steps 30] [--vit-steps 400] [--threads 2] [--data auto]
                                  [--skip-vit] [--skip-minilm] [--out benchmarks/results/recovery.json]

MiniLM-L6 (all-MiniLM-L6-v2): held-out = the 256 held-out fortunes texts `slimformer apply` measures on
(`text_splits(0, 256)[1]`); calibration (GPTQ Hessians, activation scales) = the first 64 search-split texts;
recovery trains on `--data` less the held-out texts (auto: all 12,435 Debian fortunes when the package is
installed, else the 944 other packaged ones). The first plan is recovered for
`--minutes` of wall time, the others for `--plan-steps` steps each; before/after = held-out mean cosine and
top-10 neighbour agreement.

ViT on Fashion-MNIST: the teacher from runs/vit-fmnist-teacher (trained with
`nice -n 10 python benchmarks/train_vit.py --out runs/vit-fmnist-teacher` when missing); recovery trains
on the 60,000 training images (labels unused: the teacher supplies the targets) and accuracy is measured on the
10,000 test images (Debian's dataset-fashion-mnist; the packaged 1,000 otherwise).

Writes the results JSON and prints the before/after table; docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
RESULT_FILE = REPO / "benchmarks" / "results" / "recovery.json"
TEACHER_DIR = REPO / "runs" / "vit-fmnist-teacher"


def minilm_plans(adapter: Any) -> list[tuple[str, Any]]:
    """Hand-made plans at <= 12.5% of fp32 (uniform int4 g128 is 14.2%): int4 GPTQ g128 linears plus one
    cut each. Sparsity in the int4 embedding table (a bitmask beats dense int4 above 25% zeros) costs least:
    measured before recovery, 2:4 in the table keeps 0.948 cosine where a rank-256 table keeps 0.817 and
    FFN 1024 neurons 0.771."""
    from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec

    def plan(emb_sparsity: float = 0.0, emb_rank: int | None = None, emb_g: int | None = 128,
             pattern: str = "unstructured", neurons: int | None = None) -> CompressionPlan:
        units = {u.name: (UnitSpec(rank=emb_rank, bits=4, group_size=emb_g, sparsity=emb_sparsity, pattern=pattern)
                          if u.role == "embedding" else UnitSpec(bits=4, group_size=128, method="gptq"))
                 for u in adapter.units}
        layers = {i: LayerSpec(neurons_kept=neurons) for i in range(len(adapter.layers))} if neurons else {}
        return CompressionPlan(units, layers)  # type: ignore[arg-type]

    return [
        ("embedding 50% sparse, per-row scales", plan(0.5, emb_g=None)),
        ("embedding 52% sparse", plan(0.52)),
        ("embedding 55% sparse", plan(0.55)),
        ("embedding 2:4, per-row scales", plan(0.5, emb_g=None, pattern="2:4")),
        ("embedding 60% sparse", plan(0.6)),
        ("embedding rank 256", plan(emb_rank=256)),
        ("FFN 1152 + embedding rank 320", plan(emb_rank=320, neurons=1152)),
    ]


def run_minilm(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import torch

    from slimformer.compression.apply import apply_plan
    from slimformer.compression.calibration import collect_activation_scales, collect_hessians
    from slimformer.compression.memory import plan_memory
    from slimformer.compression.plan import CompressionPlan
    from slimformer.data import DEBIAN_FORTUNES, text_splits
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.models import load
    from slimformer.recovery import RecoveryConfig, recover
    from slimformer.recovery.data import default_text_source, training_batches, training_texts

    adapter = load("sentence-transformers/all-MiniLM-L6-v2")
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    heldout = text_splits(0, 256)[1]
    cal_texts = text_splits(64, 256)[0]
    cal = adapter.make_batches(sorted(cal_texts, key=len), 32)
    hessians, act = collect_hessians(adapter, cal), collect_activation_scales(adapter, cal)
    evaluator = FidelityEvaluator(adapter, adapter.make_batches(sorted(heldout, key=len), 32))
    source = default_text_source() if args.data == "auto" else args.data
    kind = "Debian" if source == DEBIAN_FORTUNES else "packaged"
    data_label = f"{len(training_texts(source, heldout))} {kind} fortunes"
    rows = []
    plans = minilm_plans(adapter)[: args.plans]
    for i, (name, plan) in enumerate(plans):
        mem = plan_memory(adapter, plan)
        if i == 0:
            cfg = RecoveryConfig(minutes=None if args.main_steps else args.minutes, steps=args.main_steps, lr=args.lr)
        else:
            cfg = RecoveryConfig(steps=args.plan_steps, lr=args.lr)
        train = training_batches(adapter, source, cfg.batch_size, heldout, seed=cfg.seed)
        budget = f"{cfg.minutes:.1f} min" if cfg.minutes else f"{cfg.steps} steps"
        log(f"[minilm] {name}: {mem.percent:.2f}% of fp32; recovering {budget}")
        model = apply_plan(adapter, plan, act_scales=act, hessians=hessians)
        res = recover(adapter, model, train, cfg, evaluator=evaluator, log=log)
        rows.append({"plan": name, "memory_bytes": mem.total_bytes, "memory_percent": round(mem.percent, 3),
                     "data": data_label, "budget": f"{cfg.minutes} min" if cfg.minutes else f"{cfg.steps} steps",
                     "steps": res.steps, "seconds": round(res.seconds, 1), "train_samples": res.train_samples,
                     "before": res.before, "after": res.after,
                     "loss_first10": sum(res.losses[:10]) / max(1, len(res.losses[:10])),
                     "loss_last10": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])),
                     "settings": cfg.model_dump(mode="json", exclude_none=True)})
        log(f"[minilm] {name}: cosine {res.before['cosine']:.4f} -> {res.after['cosine']:.4f}, neighbours "
            f"{res.before['neighbours']:.3f} -> {res.after['neighbours']:.3f} ({res.steps} steps, {res.seconds:.0f} s)")
        _partial(args, "minilm", rows)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"model": adapter.model_id, "fp32_bytes": fp32, "heldout_texts": len(heldout),
            "train_texts": len(training_texts("fortunes", heldout)), "plans": rows}


def run_vit(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import subprocess

    from slimformer.compression.apply import apply_plan
    from slimformer.compression.memory import plan_memory
    from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec
    from slimformer.data import load_fashion_mnist
    from slimformer.data.fashion_mnist import load_full_fashion_mnist
    from slimformer.evaluators.quality import FidelityEvaluator
    from slimformer.models import load
    from slimformer.recovery import RecoveryConfig, recover
    from slimformer.recovery.data import training_batches

    if not (TEACHER_DIR / "train_info.json").exists():
        log(f"[vit] training the teacher into {TEACHER_DIR}")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_vit.py"), "--out", str(TEACHER_DIR)],
                       check=True)
    adapter = load(str(TEACHER_DIR))
    fp32 = plan_memory(adapter, CompressionPlan()).total_bytes
    full = load_full_fashion_mnist("test")
    x, y = full if full is not None else load_fashion_mnist("test")
    evaluator = FidelityEvaluator(adapter, adapter.make_batches(x, 500, y))
    inter = adapter.layers[0].intermediate
    def plan(group: int | None, neurons: int) -> CompressionPlan:
        return CompressionPlan({u.name: UnitSpec(bits=4, group_size=group) for u in adapter.units},
                               {i: LayerSpec(neurons_kept=neurons) for i in range(len(adapter.layers))})

    plans = [(f"int4 per-channel + FFN {inter * 5 // 8}", plan(None, inter * 5 // 8)),
             (f"int4 g48 + FFN {inter // 2}", plan(48, inter // 2))][: args.vit_plans]
    rows = []
    for name, plan in plans:
        mem = plan_memory(adapter, plan)
        cfg = RecoveryConfig(steps=args.vit_steps, lr=args.vit_lr, batch_size=64)
        train = training_batches(adapter, "fashion-mnist", cfg.batch_size)
        log(f"[vit] {name}: {mem.percent:.2f}% of fp32; recovering {cfg.steps} steps on {len(train)} batches")
        model = apply_plan(adapter, plan)
        res = recover(adapter, model, train, cfg, evaluator=evaluator, log=log)
        rows.append({"plan": name, "memory_bytes": mem.total_bytes, "memory_percent": round(mem.percent, 3),
                     "steps": res.steps, "seconds": round(res.seconds, 1), "train_samples": res.train_samples,
                     "before": res.before, "after": res.after,
                     "settings": cfg.model_dump(mode="json", exclude_none=True)})
        log(f"[vit] {name}: accuracy {res.before['accuracy']:.4f} -> {res.after['accuracy']:.4f} "
            f"(teacher {res.after['teacher_accuracy']:.4f}), agreement {res.before['agreement']:.4f} -> "
            f"{res.after['agreement']:.4f}")
        _partial(args, "vit", rows)
    return {"teacher_dir": str(TEACHER_DIR.relative_to(REPO)), "fp32_bytes": fp32, "test_images": int(len(x)),
            "plans": rows}


def render_table(result: dict[str, Any]) -> str:
    """The before/after tables of a results JSON (what docs/BENCHMARKS.md quotes)."""
    m = result.get("machine", {})
    load = m.get("loadavg_start")
    cmds = result.get("runs") or [result.get("command")]
    lines = [f"Measured {result.get('created', '?')} on {m.get('cpu', '?')}, {m.get('torch_threads')} torch "
             f"thread(s), load average {load[0]:.1f} at the start (shared machine); "
             + ", then ".join(f"`{c}`" for c in cmds) + ".", ""]
    mini = result.get("minilm", {})
    rows = mini.get("plans") or mini.get("plans_so_far") or []
    if rows:
        lines += [f"MiniLM-L6, held-out mean cosine / top-10 neighbour agreement on {mini.get('heldout_texts', 256)} "
                  "fortunes texts (never trained on):", "",
                  "| plan | % of fp32 | training texts | budget | steps | seconds | cosine before | cosine after "
                  "| neighbours before | neighbours after |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            b, a = r["before"], r["after"]
            lines.append(f"| {r['plan']} | {r['memory_percent']:.2f} | {r.get('data', '944 packaged fortunes')} | "
                         f"{r['budget']} | {r['steps']} | "
                         f"{r['seconds']:.0f} | {b['cosine']:.4f} | **{a['cosine']:.4f}** | {b['neighbours']:.3f} "
                         f"| {a['neighbours']:.3f} |")
        lines.append("")
    vit = result.get("vit", {})
    rows = vit.get("plans") or vit.get("plans_so_far") or []
    if rows:
        lines += [f"ViT on Fashion-MNIST ({vit.get('test_images', '?')} test images; recovery on the training "
                  "images, labels unused):", "",
                  "| plan | % of fp32 | steps | seconds | accuracy before | accuracy after | teacher accuracy "
                  "| agreement before | agreement after |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            b, a = r["before"], r["after"]
            lines.append(f"| {r['plan']} | {r['memory_percent']:.2f} | {r['steps']} | {r['seconds']:.0f} | "
                         f"{b['accuracy']:.4f} | **{a['accuracy']:.4f}** | {a['teacher_accuracy']:.4f} | "
                         f"{b['agreement']:.4f} | {a['agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def update_doc(table: str) -> None:
    """Replace the `recovery` section of docs/BENCHMARKS.md (between its begin/end markers)."""
    from slimformer.cli_profiles import update_bench_doc

    update_bench_doc("recovery", table.rstrip(), REPO / "docs" / "BENCHMARKS.md")


_RESULT: dict[str, Any] = {}


def _partial(args: argparse.Namespace, key: str, rows: list[dict[str, Any]]) -> None:
    """Write what is done so far (a long run that is stopped keeps its numbers)."""
    _RESULT.setdefault(key, {})["plans_so_far"] = rows
    _write(args.out, _RESULT)


def _write(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="recovery wall time of the first MiniLM plan")
    ap.add_argument("--main-steps", type=int, help="a step budget for the first MiniLM plan instead of --minutes")
    ap.add_argument("--plan-steps", type=int, default=30, help="recovery steps of each other MiniLM plan")
    ap.add_argument("--plans", type=int, default=6, help="how many MiniLM plans (the first is the main one)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--vit-steps", type=int, default=400)
    ap.add_argument("--vit-lr", type=float, default=1e-3)
    ap.add_argument("--vit-plans", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2-core box)")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--data", choices=["auto", "fortunes", "debian-fortunes"], default="auto",
                    help="MiniLM recovery texts: the packaged fortunes, or all of Debian's (held-out ones removed)")
    ap.add_argument("--append", action="store_true", help="add the MiniLM rows to the existing --out results")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULT_FILE)
    ap.add_argument("--table-only", action="store_true", help="re-render the docs table from --out and exit")
    args = ap.parse_args()
    if args.table_only:
        table = render_table(json.loads(args.out.read_text()))
        print(table)
        update_doc(table)
        print("docs/BENCHMARKS.md updated")
        return 0

    import torch

    from slimformer.export.bench import cpu_model
    from slimformer.threads import set_threads

    set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    t0 = time.perf_counter()
    _RESULT.update({"benchmark": "recovery", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "command": " ".join(["python", "benchmarks/recovery.py", *sys.argv[1:]]),
                    "machine": {"cpu": cpu_model(), "torch_threads": args.threads, "torch": torch.__version__,
                                "python": platform.python_version(), "loadavg_start": os.getloadavg()}})
    if not args.skip_vit:
        _RESULT["vit"] = run_vit(args, log)
        _write(args.out, _RESULT)
    if not args.skip_minilm:
        previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else {}
        if args.append:
            for key in ("vit", "minilm"):
                if key in previous:
                    _RESULT[key] = previous[key]
            _RESULT["runs"] = [*previous.get("runs", [previous.get("command")]), _RESULT["command"]]
        new = run_minilm(args, log)
        if args.append and "minilm" in previous:
            new["plans"] = previous["minilm"]["plans"] + new["plans"]
        _RESULT["minilm"] = new
    _RESULT["machine"]["loadavg_end"] = os.getloadavg()
    _RESULT["wall_s"] = round(time.perf_counter() - t0, 1)
    _write(args.out, _RESULT)
    table = render_table(_RESULT)
    print(table)
    if args.out == RESULT_FILE:
        update_doc(table)
    log(f"wrote {args.out} ({_RESULT['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
