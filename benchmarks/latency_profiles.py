"""Benchmark: the latency model on the CPU at hand (issue 14).

    python benchmarks/latency_profiles.py revalidate  [--configs 60] [--runs 25]
    python benchmarks/latency_profiles.py calibration [--configs 60] [--runs 25] [--no-second-full] [--work-dir W]
    python benchmarks/latency_profiles.py prepare --work-dir W      (exports only: run it before the quiet window)
    python benchmarks/latency_profiles.py rescore --measured FILE... --profiles P... [--fewshot 10] (no timing)

`revalidate`: every shipped calibrated profile whose CPU model is this machine's is validated again on held-out
plans (MiniLM 1x128 and the Fashion-MNIST ViT 1x17, `--configs` random plans each, at the profile's threads):
MAPE, within +-10%, Kendall tau, each against the FLOPs proxy on the same measurements. Writes
benchmarks/results/latency_profiles_revalidate.json and the `latency-profiles-revalidate` section of
docs/BENCHMARKS.md (a machine with no matching profile is recorded as such).

`calibration`: two full calibrations and one quick one at 1 thread, timed (wall clock, load average recorded),
saved under benchmarks/results/profiles/; then the validation plans are measured once and scored by all three:
each one's MAPE / within 10% / tau, the agreement of the two full calibrations (share of plans whose predictions
are within 3% of each other) and quick-vs-full tau. Writes benchmarks/results/latency_profiles_calibration.json
and the `latency-profiles-calibration` section. The first full profile is the one to ship for this CPU.

Both JSON files keep every validation plan's measured ms and each profile's prediction (`rows`), so later
models can be scored on them without timing anything (`rescore`).

`prepare`: exports every model the two commands above time (validation plans, reference and sampled plans) into
`--work-dir`; `calibration --work-dir` then reuses them (exporting MiniLM plans takes ~3.5 s of CPU each).

`rescore`: stored measurements (a `profile-validate-*.json`, or this script's JSON with `rows`) scored by each
profile as it is and, with `--fewshot K`, by its kernel tables with a shape-local residual fitted on the uniform
baselines and K of the measured plans (random splits, `--splits` of them), scored only on the other plans
(`--fit-measured` takes the fitted plans' times from another measurement of the same plans, e.g. an earlier
hour). Writes benchmarks/results/latency_profiles_rescore.json and the `latency-profiles-rescore` section.

Run revalidate and calibration on a quiet machine (1-thread timings on the thread CPU clock survive other load
only partly). `--tiny` (tests) calibrates a tiny grid and validates a few plans with short passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = (("sentence-transformers/all-MiniLM-L6-v2", "MiniLM 1x128", 1, 128), ("vit-fmnist", "ViT 1x17", 1, 17))


def _r(x: float) -> float:
    return round(float(x), 4)


def _work(args: argparse.Namespace, tmp: str, *parts: str) -> Path:
    """Where exports go: under --work-dir when given (kept and reused), else the temporary folder."""
    return (args.work_dir if args.work_dir is not None else Path(tmp)).joinpath(*parts)


def _rows(rows, preds: dict[str, list[float]] | None = None) -> list[dict]:  # noqa: ANN001
    """The per-plan record kept in the JSON: name, held out, measured ms (mean of the two passes), the second
    pass, FLOPs, and each profile's predicted ms."""
    return [{"name": r.name, "held_out": r.held_out, "measured_ms": _r(r.measured_ms), "repeat_ms": _r(r.repeat_ms),
             "flops": r.flops, "description": r.description,
             "predicted_ms": {k: _r(v[i]) for k, v in (preds or {}).items()}} for i, r in enumerate(rows)]


def _validate(profile, model: str, batch: int, seq: int, args: argparse.Namespace, work: Path):  # noqa: ANN001, ANN202
    from slimformer.hardware_profiles.references import reference_adapter
    from slimformer.hardware_profiles.validate import validate

    adapter = reference_adapter(model)
    result, rows = validate(profile, adapter, args.configs, batch, seq, profile.threads, work, runs=args.runs,
                            log=lambda m: print(f"[latency_profiles] {m}", file=sys.stderr),
                            min_pass_s=args.min_pass_s)
    return adapter, result, rows


def revalidate(args: argparse.Namespace) -> dict:
    """Validate every shipped calibrated profile of this CPU model (read-only for the profiles)."""
    from slimformer.hardware_profiles import list_profiles, load_profile
    from slimformer.hardware_profiles.machine import cpu_info

    cpu, isa = cpu_info()
    out: dict = {"cpu": cpu, "isa_flags": isa, "models": args.models, "configs": args.configs, "profiles": []}
    for name in list_profiles():
        prof = load_profile(name)
        if not prof.calibrated or prof.cpu != cpu:
            continue
        entry: dict = {"profile": name, "version": prof.version, "threads": prof.threads,
                       "runtime_version": prof.runtime_version, "isa_same": sorted(prof.isa_flags) == sorted(isa),
                       "results": []}
        for model, label, batch, seq in MODELS:
            if model not in args.models:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                _, res, rows = _validate(prof, model, batch, seq, args, _work(args, tmp, "validate", _stem(model)))
            entry["results"].append({**res.model_dump(mode="json"), "model": label, "model_id": res.model,
                                     "rows": _rows(rows, {name: [r.predicted_ms for r in rows]})})
        out["profiles"].append(entry)
    return out


def _stem(model: str) -> str:
    return model.replace("/", "_")


def revalidate_doc(data: dict) -> str:
    head = (f"`python benchmarks/latency_profiles.py revalidate --configs {data['configs']}` on **{data['cpu']}** "
            f"(ISA {', '.join(data['isa_flags'])}):")
    if not data["profiles"]:
        return head + " no shipped calibrated profile was made on this CPU model; calibrate one with " \
                      "`python benchmarks/latency_profiles.py calibration`."
    lines = [head, "", "| profile | model | plans | MAPE | within ±10% | Kendall tau | FLOPs MAPE / ±10% / tau | "
             "noise floor | load | meets (≤5%, ≥95%, ≥0.90, beats FLOPs) |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---|"]
    for p in data["profiles"]:
        for r in p["results"]:
            ok = r["mape"] <= 0.05 and r["within_10"] >= 0.95 and r["kendall_tau"] >= 0.90 and \
                r["mape"] < r["flops_mape"] and r["within_10"] >= r["flops_within_10"] and \
                r["kendall_tau"] > r["flops_kendall_tau"]
            lines.append(f"| `{p['profile']}` | {r['model']} | {r['configs']} | {100 * r['mape']:.2f}% | "
                         f"{100 * r['within_10']:.0f}% | {r['kendall_tau']:.3f} | {100 * r['flops_mape']:.2f}% / "
                         f"{100 * r['flops_within_10']:.0f}% / {r['flops_kendall_tau']:.3f} | "
                         f"{100 * r['noise_floor']:.2f}% | {r['loadavg']} | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


def _tiny_grid(quick: bool):  # noqa: ANN202
    from slimformer.export.kernels import KernelChoice
    from slimformer.hardware_profiles.calibrate import CalibrationGrid
    from slimformer.hardware_profiles.references import VIT_FMNIST
    from slimformer.hardware_profiles.sampling import RepeatPolicy

    return CalibrationGrid(m_values=(1, 17), dims=(16, 48, 96, 384),
                           linear=(KernelChoice("matmul", 32), KernelChoice("dequant_gemm", 8),
                                   KernelChoice("matmulnbits", 8, 32, 32), KernelChoice("matmulnbits", 4, 32, 32),
                                   KernelChoice("dynamic_int8", 8)),
                           embedding=(KernelChoice("gather", 32),), heads=(4,), seqs=(17,), head_dims=(24,),
                           elem_rows=(1, 17), elem_widths=(96, 384), references=(VIT_FMNIST,),
                           reference_shapes={VIT_FMNIST: ((1, 17),)},
                           policy=RepeatPolicy(min_passes=2, max_passes=2, pass_s=0.001, max_runs=5),
                           seconds=30.0, quick_mode=quick, samples=2)


def calibration(args: argparse.Namespace) -> dict:
    """Time two full and one quick calibration, then score all three on the same measured plans."""
    import numpy as np

    from slimformer.hardware_profiles.calibrate import CalibrationGrid, calibrate
    from slimformer.hardware_profiles.predict import predict
    from slimformer.hardware_profiles.profile import save_profile
    from slimformer.hardware_profiles.validate import kendall_tau, metrics, validation_plans, with_result

    runs = {"full_a": CalibrationGrid.full(), "full_b": CalibrationGrid.full(), "quick": CalibrationGrid.quick()}
    if args.tiny:
        runs = {"full_a": _tiny_grid(False), "full_b": _tiny_grid(False), "quick": _tiny_grid(True)}
    if args.no_second_full:
        del runs["full_b"]
    profiles, timing, paths = {}, {}, {}
    for key, grid in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            prof = calibrate(1, grid, progress=False, work_dir=_work(args, tmp, "calibrate"),
                             log=lambda m: print(f"[latency_profiles] {m}", file=sys.stderr))
        profiles[key] = prof
        path = paths[key] = save_profile(prof, args.results / "profiles" / f"calibration-{prof.created}-{key}.yaml")
        cal = prof.calibration
        assert cal is not None
        timing[key] = {"seconds": cal.seconds, "budget_seconds": cal.budget_seconds, "loadavg_before":
                       cal.loadavg_before, "loadavg_after": cal.loadavg_after, "cells": prof.noise.repeats
                       if prof.noise else 0, "remeasured_passes": prof.noise.remeasured_passes if prof.noise else 0,
                       "profile": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                       "version": prof.version}
    out: dict = {"cpu": profiles["full_a"].cpu, "threads": 1, "timing": timing, "models": []}
    for model, label, batch, seq in MODELS:
        if model not in args.models:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            adapter, res, rows = _validate(profiles["full_a"], model, batch, seq, args,
                                           _work(args, tmp, "validate", _stem(model)))
        profiles["full_a"] = with_result(profiles["full_a"], res)  # the profile to ship carries its validation
        save_profile(profiles["full_a"], paths["full_a"])
        plans, _ = validation_plans(adapter, args.configs)
        held = [r for r in rows if r.held_out]
        meas = np.array([r.measured_ms for r in held])
        every = {k: [predict(adapter, plans[r.name], batch, seq, p).ms for r in rows] for k, p in profiles.items()}
        pred = {k: np.array([v for v, r in zip(every[k], rows, strict=True) if r.held_out]) for k in profiles}
        entry: dict = {"model": label, "model_id": model, "batch": batch, "seq": seq, "plans": len(held),
                       "date": res.date, "noise_floor": res.noise_floor, "loadavg": res.loadavg,
                       "rows": _rows(rows, every),
                       "flops": {"mape": res.flops_mape, "within_10": res.flops_within_10,
                                 "kendall_tau": res.flops_kendall_tau},
                       "scores": {k: {m: _r(v) for m, v in metrics(meas, p).items()} for k, p in pred.items()}}
        if "full_b" in pred:
            diff = np.abs(pred["full_a"] - pred["full_b"]) / ((pred["full_a"] + pred["full_b"]) / 2)
            entry["full_agreement"] = {"within_3": _r((diff <= 0.03).mean()), "median": _r(np.median(diff)),
                                       "max": _r(diff.max())}
        entry["quick_vs_full"] = {"tau_difference": _r(entry["scores"]["quick"]["kendall_tau"]
                                                       - entry["scores"]["full_a"]["kendall_tau"]),
                                  "tau_between_predictions": _r(kendall_tau(pred["quick"], pred["full_a"]))}
        out["models"].append(entry)
    return out


def calibration_doc(data: dict) -> str:
    t = data["timing"]
    lines = [f"`python benchmarks/latency_profiles.py calibration` on **{data['cpu']}**, 1 thread. Calibration wall "
             "time: " + "; ".join(f"{k} **{v['seconds']:.0f} s** (budget {v['budget_seconds']:.0f} s, load "
                                   f"{v['loadavg_before']} -> {v['loadavg_after']}, {v['cells']} cells, "
                                   f"{v['remeasured_passes']} outlier passes re-measured)" for k, v in t.items())
             + " (targets: full ≤ 600 s, quick ≤ 180 s). Profiles: "
             + ", ".join(f"`{v['profile']}`" for v in t.values()) + ".", "",
             "| model | profile | MAPE | within ±10% | Kendall tau | full A vs B within 3% (median, max) | "
             "quick − full tau | FLOPs MAPE / ±10% / tau | noise floor |", "|---|---|---:|---:|---:|---|---:|---|---:|"]
    for m in data["models"]:
        agree = m.get("full_agreement")
        for k, s in m["scores"].items():
            a = (f"{100 * agree['within_3']:.0f}% ({100 * agree['median']:.2f}%, {100 * agree['max']:.2f}%)"
                 if agree and k == "full_b" else "")
            q = f"{m['quick_vs_full']['tau_difference']:+.3f}" if k == "quick" else ""
            f = m["flops"]
            lines.append(f"| {m['model']} ({m['plans']}) | {k} | {100 * s['mape']:.2f}% | {100 * s['within_10']:.0f}% "
                         f"| {s['kendall_tau']:.3f} | {a} | {q} | {100 * f['mape']:.2f}% / {100 * f['within_10']:.0f}% "
                         f"/ {f['kendall_tau']:.3f} | {100 * m['noise_floor']:.2f}% |")
    return "\n".join(lines)


def prepare(args: argparse.Namespace) -> dict:
    """Export (no timing) every model `calibration` and `revalidate` time into --work-dir."""
    from slimformer.hardware_profiles.calibrate import CalibrationGrid
    from slimformer.hardware_profiles.model_timing import export_plans
    from slimformer.hardware_profiles.references import reference_adapter, reference_plans
    from slimformer.hardware_profiles.residual_fit import sampled_plans
    from slimformer.hardware_profiles.validate import validation_plans

    if args.work_dir is None:
        raise SystemExit("error: prepare needs --work-dir (where calibration --work-dir will find the exports)")
    samples = max(CalibrationGrid.full().samples, CalibrationGrid.quick().samples)
    out: dict = {"work_dir": str(args.work_dir), "exported": {}}
    for model in args.models:
        adapter = reference_adapter(model)
        plans, _ = validation_plans(adapter, args.configs)
        export_plans(adapter, plans, args.work_dir / "validate" / _stem(model))
        refs = {**reference_plans(adapter), **sampled_plans(adapter, samples)}
        export_plans(adapter, refs, args.work_dir / "calibrate" / _stem(model))
        out["exported"][model] = len(plans) + len(refs)
    return out


def _measured_sets(path: Path) -> list[dict]:
    """Measured validation rows from a profile-validate JSON or this script's calibration / revalidate JSON."""
    data = json.loads(path.read_text())
    if "summary" in data:
        s = data["summary"]
        return [{"source": s.get("date") or path.name, "model": s["model"], "batch": s["batch"], "seq": s["seq"],
                 "rows": data["rows"]}]
    sets = [m for m in data.get("models", []) if "rows" in m]
    sets += [r | {"model_id": r["model_id"]} for p in data.get("profiles", []) for r in p["results"] if "rows" in r]
    if not sets:
        raise SystemExit(f"error: {path} holds no per-plan rows (measured before this script kept them)")
    return [{"source": m.get("date") or path.name, "model": m["model_id"], "batch": m["batch"], "seq": m["seq"],
             "rows": m["rows"]} for m in sets]


def _bare(profile):  # noqa: ANN001, ANN202
    lm = profile.latency_model
    return profile.model_copy(update={"latency_model": lm.model_copy(update={"residual": {}, "local_residual": {}})})


def rescore(args: argparse.Namespace) -> dict:
    """Score stored measurements with profiles as they are and with a few-shot shape-local residual (no timing)."""
    import numpy as np

    from slimformer.compression.plan_semantics import canonical_plan
    from slimformer.hardware_profiles import load_profile
    from slimformer.hardware_profiles.predict import predict_canonical
    from slimformer.hardware_profiles.references import reference_adapter
    from slimformer.hardware_profiles.shape_residual import (
        ShapePoint,
        apply_shape_residual,
        fit_shape_residual,
        group_ms,
        kept_heads,
    )
    from slimformer.hardware_profiles.validate import drew_kernels, metrics, validation_plans

    fit_sets = {(s["model"], s["batch"], s["seq"]): s for f in args.fit_measured for s in _measured_sets(f)}
    out: dict = {"fewshot": args.fewshot, "splits": args.splits, "results": []}
    for st in (s for f in args.measured for s in _measured_sets(f)):
        adapter = reference_adapter(st["model"])
        held = [r for r in st["rows"] if r["held_out"]]
        base = [r for r in st["rows"] if not r["held_out"]]
        plans, _ = validation_plans(adapter, 1 + max(int(r["name"][4:]) for r in held),
                                    kernels=drew_kernels([r.get("description", "") for r in held]))
        canon = {r["name"]: canonical_plan(adapter, plans[r["name"]]) for r in st["rows"]}
        fit_src = fit_sets.get((st["model"], st["batch"], st["seq"]), st)
        fit_ms = {r["name"]: r["measured_ms"] for r in fit_src["rows"]}
        meas = np.array([r["measured_ms"] for r in held])
        flops = np.array([r["flops"] for r in held])
        kept: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}  # as-is and per-split few-shot predictions
        for name in args.profiles:
            prof = load_profile(name)
            b, q = st["batch"], st["seq"]
            as_is = np.array([predict_canonical(adapter, canon[r["name"]], b, q, prof).ms for r in held])
            bare = {n: predict_canonical(adapter, c, b, q, _bare(prof)) for n, c in canon.items()}
            heads = {n: kept_heads(adapter, c) for n, c in canon.items()}
            entry: dict = {"measured": st["source"], "fit_measured": fit_src.get("source", st["source"]),
                           "model": st["model"], "batch": b, "seq": q, "profile": str(name), "plans": len(held),
                           "as_is": {k: _r(v) for k, v in metrics(meas, as_is).items()},
                           "flops": {k: _r(v) for k, v in metrics(meas, flops * np.median(meas / flops)).items()}}
            if args.fewshot > 0:
                rng = np.random.default_rng(0)
                few, same = [], []
                for _ in range(args.splits):
                    order = rng.permutation(len(held))
                    fit_rows = base + [held[i] for i in order[:args.fewshot]]
                    res = fit_shape_residual([ShapePoint(r["name"], group_ms(bare[r["name"]].breakdown),
                                                         heads[r["name"]], fit_ms[r["name"]])
                                              for r in fit_rows], b, q)
                    rest = order[args.fewshot:]
                    pred = np.array([apply_shape_residual(res, bare[held[i]["name"]].breakdown,
                                                          heads[held[i]["name"]]) for i in rest])
                    few.append(metrics(meas[rest], pred))
                    same.append(metrics(meas[rest], as_is[rest]))
                    kept.setdefault(str(name), (as_is, []))[1].append(pred)
                entry["fewshot"] = {k: _r(np.mean([m[k] for m in few])) for k in few[0]}
                entry["as_is_same_plans"] = {k: _r(np.mean([m[k] for m in same])) for k in same[0]}
            out["results"].append(entry)
        if len(kept) >= 2:  # the first two profiles' predictions of the same plans: as is, and few-shot per split
            (a0, af), (b0, bf) = list(kept.values())[:2]
            out.setdefault("agreement", []).append({
                "measured": st["source"], "model": st["model"], "profiles": list(kept)[:2],
                "as_is": _agreement(a0, b0), "fewshot": {k: _r(np.mean([_agreement(x, y)[k] for x, y in zip(
                    af, bf, strict=True)])) for k in ("within_3", "median")}})
    return out


def _agreement(a, b) -> dict:  # noqa: ANN001
    """Share of plans whose two predictions are within 3% of each other (of their mean), and the median gap."""
    import numpy as np

    d = np.abs(a - b) / ((a + b) / 2)
    return {"within_3": _r((d <= 0.03).mean()), "median": _r(np.median(d))}


def rescore_doc(data: dict) -> str:
    k = data["fewshot"]
    lines = [f"`python benchmarks/latency_profiles.py rescore` (no timing: stored measurements re-scored; few-shot: "
             f"the profile's kernel tables with a shape-local residual fitted on the 4 uniform baselines and {k} of "
             f"the measured plans, scored on the other plans, mean over {data['splits']} random splits):", "",
             "| measured (fit on) | model | profile | as is: MAPE / ±10% / tau | as is, same plans | few-shot: MAPE / "
             "±10% / tau | FLOPs proxy |", "|---|---|---|---|---|---|---|"]

    def f(m: dict | None) -> str:
        return "" if not m else f"{100 * m['mape']:.2f}% / {100 * m['within_10']:.0f}% / {m['kendall_tau']:.3f}"

    for e in data["results"]:
        src = e["measured"] + ("" if e["fit_measured"] == e["measured"] else f" ({e['fit_measured']})")
        lines.append(f"| {src} | {e['model'].split('/')[-1]} {e['batch']}x{e['seq']} ({e['plans']}) | "
                     f"`{Path(e['profile']).name}` | {f(e['as_is'])} | {f(e.get('as_is_same_plans'))} | "
                     f"{f(e.get('fewshot'))} | {f(e['flops'])} |")
    for a in data.get("agreement", []):
        one, two = (Path(x).name for x in a["profiles"])
        lines += ["", f"{a['model'].split('/')[-1]}: `{one}` and `{two}` predict within 3% of each other on "
                      f"{100 * a['as_is']['within_3']:.0f}% of the plans as they are (median gap "
                      f"{100 * a['as_is']['median']:.1f}%), on {100 * a['fewshot']['within_3']:.0f}% with the "
                      f"few-shot residual (median gap {100 * a['fewshot']['median']:.1f}%)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("revalidate", "calibration", "prepare", "rescore"))
    ap.add_argument("--configs", type=int, default=60, help="random held-out plans per model")
    ap.add_argument("--runs", type=int, default=25, help="timed rounds per validation pass (at least)")
    ap.add_argument("--min-pass-s", type=float, default=20.0, help="each validation pass lasts at least this long")
    ap.add_argument("--models", nargs="+", default=[m for m, *_ in MODELS], choices=[m for m, *_ in MODELS])
    ap.add_argument("--no-second-full", action="store_true", help="calibration: one full run only (no agreement)")
    ap.add_argument("--tiny", action="store_true", help="calibration: tiny grids (tests)")
    ap.add_argument("--work-dir", type=Path, help="keep exports here and reuse them (see prepare)")
    ap.add_argument("--measured", type=Path, nargs="+", default=[], help="rescore: stored measurement JSON files")
    ap.add_argument("--fit-measured", type=Path, nargs="*", default=[],
                    help="rescore: take the few-shot plans' times from these (another measurement of the same plans)")
    ap.add_argument("--profiles", nargs="+", default=[], help="rescore: profiles (names or paths)")
    ap.add_argument("--fewshot", type=int, default=10, help="rescore: measured plans the local residual is fitted on")
    ap.add_argument("--splits", type=int, default=20, help="rescore: random few-shot splits averaged")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    from slimformer.cli_profiles import update_bench_doc
    from slimformer.fileio import atomic_write

    if not args.doc.is_file():
        print(f"error: {args.doc} does not exist; pass --doc or run from the repository", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    if args.what == "prepare":
        print(json.dumps(prepare(args)))
        return 0
    if args.what == "revalidate":
        data = revalidate(args)
        body = revalidate_doc(data)
    elif args.what == "rescore":
        if not args.measured or not args.profiles:
            print("error: rescore needs --measured FILE... and --profiles P...", file=sys.stderr)
            return 2
        data = rescore(args)
        body = rescore_doc(data)
    else:
        data = calibration(args)
        body = calibration_doc(data)
    atomic_write(args.results / f"latency_profiles_{args.what}.json", json.dumps(data, indent=1))
    update_bench_doc(f"latency-profiles-{args.what}", body, args.doc)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
