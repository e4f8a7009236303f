"""The Python API; the CLI is a thin shell over these functions."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimformer.compression.apply import apply_plan
from slimformer.compression.calibration import (
    collect_activation_scales,
    collect_hessians,
    collect_input_abs_max,
    collect_structure_stats,
)
from slimformer.compression.memory import MemoryReport, plan_memory, set_deploy
from slimformer.compression.plan import CompressionPlan
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import ONNX_FILE, RECIPE_FILE, check_out_dir, load_any, write_compressed
from slimformer.compression.smoothing import smoothed_units
from slimformer.errors import BudgetError, ConfigError, notice
from slimformer.fileio import atomic_dir, check_output_path
from slimformer.models import ModelAdapter

if TYPE_CHECKING:  # search (optuna) is imported by the functions that use it: `inspect` does not load it
    from slimformer.search import SearchConfig, SearchResult


def load_model(model: str, max_length: int | None = None) -> ModelAdapter:
    """Load a model directory, hub id, `timm:ARCH`, or compressed slimformer output."""
    return load_any(model, max_length=max_length)


@dataclass(frozen=True)
class UnitRow:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    params: int
    bytes: int


@dataclass(frozen=True)
class InspectReport:
    model_id: str
    kind: str
    units: list[UnitRow]
    memory: MemoryReport
    num_layers: int
    heads: int
    intermediate: int

    def format(self) -> str:
        lines = [f"model {self.model_id} ({self.kind}): {self.num_layers} layers, {self.heads} heads, "
                 f"FFN width {self.intermediate}", "",
                 f"{'unit':58s} {'role':10s} {'layer':>5s} {'shape':>13s} {'params':>10s} {'bytes':>11s}"]
        for u in self.units:
            layer = "-" if u.layer is None else str(u.layer)
            lines.append(f"{u.name:58s} {u.role:10s} {layer:>5s} {str(u.shape[0]) + 'x' + str(u.shape[1]):>13s} "
                         f"{u.params:>10,d} {u.bytes:>11,d}")
        total = self.memory.total_bytes
        lines += ["", "memory breakdown (fp32 weights):"]
        for g, b in self.memory.by_group.items():
            lines.append(f"  {g:11s} {b:>13,d} bytes  {100 * b / total:5.1f}%")
        lines.append(f"  {'total':11s} {total:>13,d} bytes  ({total / 1e6:.2f} MB)")
        return "\n".join(lines)


def inspect_model(model: str | ModelAdapter) -> InspectReport:
    """Each compressible unit (name, role, layer, shape, parameters, bytes) and the memory breakdown."""
    adapter = load_any(model) if isinstance(model, str) else model
    mem = plan_memory(adapter, CompressionPlan())
    rows = [UnitRow(u.name, u.role, u.layer, u.shape, u.params, mem.per_unit[u.name]) for u in adapter.units]
    first = adapter.layers[0]
    return InspectReport(adapter.model_id, adapter.kind, rows, mem, len(adapter.layers), first.num_heads,
                         first.intermediate)


def search(config: str | Path | SearchConfig | None = None, **overrides: Any) -> SearchResult:
    """Run or resume a search; `config` None uses the embedded Quickstart defaults."""
    from slimformer.search import SearchConfig, run_search

    cfg = config if isinstance(config, SearchConfig) else SearchConfig.load(config)
    return run_search(cfg, **overrides)


@dataclass(frozen=True)
class OnnxExportResult:
    """`onnx/model.onnx` written into a compressed model directory: sizes and agreement with the torch model."""

    path: Path
    file_bytes: int
    resident_bytes: int
    cosine: float  # mean cosine of ONNX outputs to the torch compressed model's on the fidelity data
    max_abs_diff: float
    # per-unit (each unit's recipe kernel; cosine ~1.0 to torch, which computes the int8 units the same way) |
    # exact | fast (overrides of every unit; fast: SmoothQuant int8 GEMMs, ~0.99 to torch, documented)
    kernels: str = "per-unit"


@dataclass(frozen=True)
class ApplyResult:
    out_dir: Path | None
    memory: MemoryReport
    fidelity: dict[str, float]
    n_samples: int
    onnx: OnnxExportResult | None = None
    recovery: Any = None  # slimformer.recovery.RecoveryResult when applied with recovery (fidelity is after it)


def _fidelity_batches(adapter: ModelAdapter, data: str, samples: int) -> list[Any]:
    """Held-out data (never the search split) in the adapter family's own form, with labels if it has them."""
    held = adapter.heldout_samples(data, samples)
    return adapter.make_batches(held.inputs, 32, held.labels)


def _calibration_batches(adapter: ModelAdapter, data: str, n: int) -> list[Any]:
    """Calibration data for data-aware transforms: the start of the search split (never the held-out one)."""
    return adapter.make_batches(adapter.calibration_samples(data, n), 32)


def apply_recipe(recipe: str | Path | Recipe, model: str, out_dir: str | Path | None = None,
                 data: str = "fortunes", samples: int = 256, calibration: int = 64,
                 onnx: bool = False, kernels: str | None = None, recover: Any = None, progress: bool = False,
                 log: Any = None) -> ApplyResult:
    """Compress `model` as the recipe says, measure memory and fidelity, optionally save to `out_dir`.

    Fidelity is measured against the uncompressed model on held-out data (never the search set for
    the packaged corpus). The recipe's provenance is kept; applying twice gives identical weights.
    `onnx=True` (needs `out_dir`) also writes `out_dir/onnx/model.onnx` and checks it against the torch model;
    `kernels`: None (each unit's recipe kernel) or 'exact' | 'fast' to override every unit's ONNX kernel
    (slimformer.export.kernels).
    `recover` (a slimformer.recovery.RecoveryConfig) distils the compressed model from the uncompressed one on
    data disjoint from the held-out set before measuring/saving; the saved recipe records it.
    """
    from slimformer.evaluators.quality import FidelityEvaluator

    if onnx and out_dir is None:
        raise ConfigError("--onnx needs --out: onnx/model.onnx is written into the output directory")
    if kernels is not None and not onnx:
        raise ConfigError(f"--kernels {kernels} applies to the ONNX export; add --onnx (and --out)")
    say = log or (lambda _msg: None)
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if out_dir is not None:
        check_output_path(out_dir, "--out", kind="dir")
        if Path(out_dir).exists() and any(Path(out_dir).iterdir()) and not (Path(out_dir) / "slimformer.yaml").exists():
            raise ConfigError(f"--out {out_dir} exists and is not a slimformer output; choose an empty path")
    adapter = load_any(model)
    if _recipe_budget(rec).get("deploy") == "onnx":  # price memory as the search that made the recipe did
        from slimformer.export import graph_overhead_bytes

        set_deploy(adapter, "onnx", graph_overhead_bytes(adapter))
    plan = rec.to_plan(adapter)
    budget = _recipe_budget(rec)
    if onnx and budget.get("deploy") == "onnx" and isinstance(budget.get("bytes"), int):
        need = plan_memory(adapter, plan).total_bytes  # an upper bound of the file: refuse before any compute
        if need > budget["bytes"]:
            raise BudgetError(f"{ONNX_FILE} would need up to {need:,d} bytes, over the recipe's budget of "
                              f"{budget['bytes']:,d} bytes (provenance budget, deploy onnx); apply the recipe to "
                              "the model it was made for, or drop --onnx")
    # every input read before the first progress line: bad data (held-out or recovery) is the only line on stderr
    held_out = _fidelity_batches(adapter, data, samples)
    train = None
    if recover is not None:
        from slimformer.recovery.data import training_batches

        train = training_batches(adapter, recover.data, recover.batch_size, _recovery_exclusions(adapter, recover.data,
                                 data, samples), recover.samples, recover.seed)
    if rec.model.sha256 and rec.model.sha256 != adapter.weights_sha256():
        notice(f"recipe was made for weights {rec.model.sha256[:12]}…, this model has "
               f"{adapter.weights_sha256()[:12]}…; applying anyway", stacklevel=2)
    act = hessians = stats = act_max = None
    needs_act = any(s.rank is not None for s in plan.units.values())
    needs_h = any(s.needs_hessian for s in plan.units.values())
    needs_s = bool(plan.layers) and plan.structure.needs_data
    smoothed = smoothed_units(plan)
    if needs_act or needs_h or needs_s or smoothed:
        say(f"calibrating on {calibration} {data} samples (activation scales / GPTQ Hessians / structure / "
            "SmoothQuant)")
        cal = _calibration_batches(adapter, data, calibration)
        act = collect_activation_scales(adapter, cal) if needs_act else None
        hessians = collect_hessians(adapter, cal) if needs_h else None
        stats = collect_structure_stats(adapter, cal) if needs_s else None
        act_max = collect_input_abs_max(adapter, cal, smoothed) if smoothed else None
    say(f"applying the plan ({len(plan.units)} units)")
    compressed = apply_plan(adapter, plan, act_scales=act, hessians=hessians, structure_stats=stats,
                            act_max=act_max)
    say(f"scoring fidelity on {samples} held-out {data} samples")
    evaluator = FidelityEvaluator(adapter, held_out)
    result = evaluator.evaluate(compressed)
    recovered = None
    if recover is not None and train is not None:
        from slimformer.recovery import recover as run_recovery

        say(f"recovery: distilling on {len(train)} batches of {recover.data or 'default'} training data")
        recovered = run_recovery(adapter, compressed, train, recover, progress=progress, log=log,
                                 evaluator=evaluator)
        say("scoring the recovered model on the held-out samples")
        result = evaluator.evaluate(compressed)
        rec = rec.model_copy(update={"recovery": recovered.record()})
    mem = plan_memory(adapter, plan)
    saved = None
    exported = None
    if out_dir is not None:  # every file (onnx/model.onnx too) is written in a temp dir renamed into place at the end
        saved = Path(out_dir)
        check_out_dir(saved)
        say(f"saving {out_dir}")
        with atomic_dir(saved) as tmp:
            write_compressed(adapter, compressed, rec, tmp)
            if onnx:
                say(f"exporting ONNX ({kernels or 'per-unit'} kernels) and checking it against torch")
                cal_batches = _calibration_batches(adapter, data, calibration) if kernels == "fast" else None
                exported = _export_checked(adapter, compressed, tmp / ONNX_FILE, evaluator.batches, kernels,
                                           cal_batches, _recipe_sha256(tmp))
                _check_onnx_budget(rec, exported)  # raises inside: nothing is written
        if exported is not None:
            exported = replace(exported, path=saved / ONNX_FILE)
    return ApplyResult(saved, mem, result.metrics, result.n_samples, exported, recovered)


def _recovery_exclusions(adapter: ModelAdapter, recover_data: str, data: str, samples: int) -> list[str]:
    """Texts recovery must not train on: the held-out samples of the fidelity source `data` and, for a `+` mixture
    of recovery sources (e.g. debian-fortunes+python-docs*4), the held-out samples of each of its parts too."""
    from slimformer.data.training import mixture_parts

    out = list(adapter.recovery_exclusions(data, samples))
    parts = mixture_parts(recover_data)
    if len(parts) > 1:
        for part, _ in parts:
            if part != data:
                out.extend(adapter.recovery_exclusions(part, samples))
    return out


def _recipe_budget(rec: Recipe) -> dict[str, Any]:
    """The recipe's provenance `budget: {bytes, deploy}` (written by searches), {} when absent."""
    budget = rec.provenance.budget
    return {} if budget is None else {"bytes": budget.bytes, "deploy": budget.deploy}


def _check_onnx_budget(rec: Recipe, exported: OnnxExportResult) -> None:
    """BudgetError when the ONNX file exceeds the budget the recipe was searched under for the onnx deploy
    target (provenance `budget: {bytes, deploy}`; recipes without it are not checked)."""
    budget = _recipe_budget(rec)
    if budget.get("deploy") != "onnx" or not isinstance(budget.get("bytes"), int):
        return
    if exported.file_bytes > budget["bytes"]:
        hint = "; --kernels fast stores int4 codes as int8, use --kernels exact" if exported.kernels == "fast" else \
            "; please report it: the onnx memory model under-estimated this plan"
        raise BudgetError(f"{ONNX_FILE} would be {exported.file_bytes:,d} bytes, over the recipe's budget of "
                          f"{budget['bytes']:,d} bytes (provenance budget, deploy onnx); nothing was written{hint}")


def _recipe_sha256(model_dir: Path) -> str:
    """sha256 of a compressed directory's recipe file, recorded in the ONNX file's metadata_props."""
    import hashlib

    return hashlib.sha256((model_dir / RECIPE_FILE).read_bytes()).hexdigest()


def _export_checked(adapter: ModelAdapter, model: Any, path: Path, batches: list[Any], kernels: str | None = None,
                    calibration: list[Any] | None = None, recipe_sha256: str | None = None) -> OnnxExportResult:
    """Export `model` to `path` and compare the ONNX outputs with the torch model's on `batches` (the
    deployed output: `adapter.export_outputs(...)[0]`, e.g. the normalised sentence embedding)."""
    import numpy as np
    import torch

    from slimformer.export import export_onnx, onnx_outputs, resident_weight_bytes

    meta = {"recipe_sha256": recipe_sha256} if recipe_sha256 else None
    info = export_onnx(adapter, model, path, kernels=kernels, calibration=calibration,  # type: ignore[arg-type]
                       metadata=meta)
    with torch.no_grad():
        model.eval()
        ref = torch.cat([adapter.export_outputs(model, b)[0].to(torch.float32) for b in batches]).cpu().numpy()
    out = onnx_outputs(info.path, batches)
    cos = (out * ref).sum(-1) / np.maximum(np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-12)
    return OnnxExportResult(info.path, info.file_bytes, resident_weight_bytes(info.path), float(cos.mean()),
                            float(np.abs(out - ref).max()), info.kernel_mode)


def export_model(model_dir: str | Path, out: str | Path | None = None, kernels: str | None = None,
                 log: Any = None) -> OnnxExportResult:
    """Export a compressed model directory (written by `apply --out`) to ONNX, `model_dir/onnx/model.onnx` by
    default.

    The agreement check runs the torch and ONNX models on 64 held-out fortunes texts (or test images).
    """
    from slimformer.compression.saving import load_compressed

    d = Path(model_dir)
    if not (d / RECIPE_FILE).is_file():
        raise ConfigError(f"{d} is not a compressed slimformer model directory (no {RECIPE_FILE})")
    check_output_path(Path(out) if out is not None else d / ONNX_FILE, "--out" if out is not None else ONNX_FILE)
    say = log or (lambda _msg: None)
    adapter = load_compressed(d)  # no line before it: a broken directory's error is the only line on stderr
    say(f"loaded {d}; exporting ONNX ({kernels} kernels) and checking it against torch on 64 held-out samples")
    cal = _calibration_batches(adapter, "fortunes", 64) if kernels == "fast" else None
    return _export_checked(adapter, adapter.model, Path(out) if out is not None else d / ONNX_FILE,
                           _fidelity_batches(adapter, "fortunes", 64), kernels, cal, _recipe_sha256(d))


def bench(target: str | Path, model: str | None = None, data: str = "fortunes", samples: int = 256,
          threads: int = 1, seqs: tuple[int, ...] = (64, 128), batches: tuple[int, ...] = (1, 32), runs: int = 30,
          warmup: int = 3, work_dir: str | Path | None = None, log: Any = None, kernels: str | None = None,
          optimized_baseline: bool = False, recover: Any = None) -> Any:
    """Benchmark a compressed model (a recipe, a compressed directory or an .onnx file) against fp32 and
    onnxruntime dynamic-int8 baselines (with `optimized_baseline`, also ORT's transformers-optimised dynamic int8);
    returns `slimformer.export.bench.BenchResult`.

    A recipe needs `model` (what it is applied to); an .onnx file needs `model` (the uncompressed model:
    tokenizer and fp32 teacher); a compressed directory uses `model` or else the recipe's model id.
    `kernels` (None: each unit's recipe kernel; 'exact' | 'fast': an override of every unit) is how a recipe or
    directory target is exported (recorded in `extra`). `recover` (a slimformer.recovery.RecoveryConfig, recipe
    targets only) distils the applied recipe first, so the fidelity columns are the recovered model's.
    """
    import tempfile

    from slimformer.compression.saving import RECIPE_FILE, load_compressed
    from slimformer.export import export_onnx
    from slimformer.export.bench import bench_models

    t = Path(target)
    if recover is not None and (t.is_dir() or t.suffix.lower() == ".onnx"):
        raise ConfigError(f"--recover applies to a recipe TARGET; {t} already holds its weights (bench it without "
                          "--recover, or bench the recipe)")
    say = log or (lambda _msg: None)
    recovered = None  # the recipe target's RecoveryRecord (as JSON) when `recover` is given
    opts = dict(data=data, samples=samples, threads=threads, seqs=seqs, batches=batches, runs=runs,
                warmup=warmup, work_dir=work_dir, log=log, optimized_baseline=optimized_baseline)
    with tempfile.TemporaryDirectory() as tmp:
        if t.is_dir():
            if not (t / RECIPE_FILE).is_file():
                raise ConfigError(f"{t} is not a compressed slimformer model directory (no {RECIPE_FILE})")
            compressed = load_compressed(t)
            ref_id = model or compressed.recipe.model.id  # type: ignore[attr-defined]
            say(f"exporting {t} to ONNX")
            cal = _calibration_batches(compressed, data, 64) if kernels == "fast" else None
            onnx_path = export_onnx(compressed, compressed.model, Path(tmp) / "target.onnx", kernels=kernels,  # type: ignore[arg-type]
                                    calibration=cal).path
        elif t.suffix.lower() == ".onnx":
            if not t.is_file():
                raise ConfigError(f"{t} does not exist")
            if model is None:
                raise ConfigError(f"bench on an .onnx file needs --model (the uncompressed model {t.name} was "
                                  "made from: tokenizer and fp32 teacher)")
            _check_onnx_file(t)
            ref_id, onnx_path = model, t
        else:
            if model is None:
                raise ConfigError(f"bench on a recipe needs --model (the model {t.name} is applied to)")
            say(f"applying {t} to {model}")
            res = apply_recipe(t, model, out_dir=Path(tmp) / "compressed", data=data, samples=samples, onnx=True,
                               kernels=kernels, recover=recover, log=log)
            assert res.onnx is not None
            ref_id, onnx_path = model, res.onnx.path
            recovered = None if res.recovery is None else res.recovery.record().model_dump(mode="json")
        reference = load_any(ref_id)
        result = bench_models(reference, onnx_path, target_name=str(t), **opts)  # type: ignore[arg-type]
        result.extra["kernels"] = "as stored in the file" if t.suffix.lower() == ".onnx" else kernels or "per-unit"
        if recover is not None:
            result.extra["recovery"] = recovered
        return result


def _check_onnx_file(path: Path) -> None:
    """ConfigError (one line) unless `path` parses as an ONNX model (external weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
        problem = None if proto.graph.node and proto.graph.input and proto.graph.output else "no graph"
    except Exception as exc:
        problem = type(exc).__name__
    if problem is not None:
        raise ConfigError(f"{path} is not a readable ONNX model ({problem}); pass a model.onnx "
                          "written by `slimformer export` or `apply --onnx`")


def _context_for_run(run_dir: Path) -> tuple[Any, Any, str]:
    """(context, study, storage URL with its password masked) of an existing run directory; Optuna's
    "Using an existing study" line is not printed."""
    import optuna

    from slimformer.search import SearchConfig
    from slimformer.search.context import prepare
    from slimformer.search.runner import default_storage, open_study
    from slimformer.search.storage import check_storage_url, hide_password

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{run_dir} is not a slimformer run directory (no config.yaml)")
    cfg = SearchConfig.load(cfg_file)
    if cfg.storage is None and not (run_dir / "study.db").exists():
        raise ConfigError(f"{run_dir}: no study.db; the search has not run yet")
    if cfg.storage is not None:
        check_storage_url(cfg.storage)
    ctx = prepare(cfg, log=lambda _msg: None)  # re-opening a run: no machine or progress lines before its answer
    url = cfg.storage or default_storage(run_dir)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = open_study(ctx, url, cfg.study_name, read_only=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return ctx, study, hide_password(url)


def export_recipe(run_dir: str | Path, trial: int, out: str | Path | None = None) -> Recipe:
    """The recipe of any finished, feasible trial of a run (written to `out` when given)."""
    from slimformer.search.evaluate import trial_plan
    from slimformer.search.records import TrialRecord, is_feasible
    from slimformer.search.results import RecipeProvenance

    rd = Path(run_dir)
    if out is not None:
        check_output_path(out, "--out")
    ctx, study, url = _context_for_run(rd)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial not in trials:
        raise ConfigError(f"trial {trial} is not in {rd} (trials 0..{max(trials, default=-1)})")
    t = trials[trial]
    if not is_feasible(t):
        record = TrialRecord.from_trial(t)
        why = f"over the {record.over_budget or 'memory'} budget" if record.feasible is False else "not evaluated"
        raise ConfigError(f"trial {trial} is {t.state.name} and {why}; "
                          "pick a completed trial within the budget")
    provenance = RecipeProvenance.of_trial(ctx.config.study_name, url, t, budget_bytes=ctx.budget_bytes,
                                           deploy=ctx.config.deploy)
    rec = Recipe.from_plan(trial_plan(ctx, t), ctx.adapter, hardware_profile=ctx.profile.name,
                           hardware_profile_version=ctx.profile.version, provenance=provenance.to_json())
    if out is not None:
        rec.save(out)
    return rec


def report(run_dir: str | Path, bench: int = 0, runs: int = 30, log: Any = None) -> Path:
    """Rewrite pareto.json, recipes, pareto.png and report.html from the study as it stands.

    `bench` N > 0 also exports the N Pareto plans with the best held-out quality to ONNX (in a temporary
    folder) and times each with `bench` at the search's batch x seq and thread count, next to its predicted
    latency and its roofline estimate; the numbers go to bench.json and into the report. N = 0 exports nothing.
    """
    from slimformer.fileio import read_json
    from slimformer.search.results import BaselineResult
    from slimformer.search.rundir import write_outputs, write_report_files

    if bench < 0:
        raise ConfigError(f"--bench {bench}: give the number of Pareto plans to measure (0 measures none)")
    rd = Path(run_dir)
    if rd.is_dir():
        check_output_path(rd, "run directory", kind="dir")
    ctx, study, url = _context_for_run(rd)
    baselines = [BaselineResult(**b) for b in read_json(rd / "baselines.json", [])]
    prev = read_json(rd / "summary.json", {})
    summary = write_outputs(ctx, rd, study, baselines, ctx.config.study_name, url, float(prev.get("elapsed_s", 0.0)))
    if bench > 0:
        entries = _bench_front(ctx, rd, bench, runs, log)
        write_report_files(ctx, rd, study, entries, baselines, summary)
    return rd / "report.html"


def _bench_front(ctx: Any, run_dir: Path, n: int, runs: int, log: Any) -> list[Any]:
    """Measure the `n` best Pareto plans (held-out quality) with `bench`; writes bench.json, returns the front."""
    import os

    import onnxruntime as ort

    from slimformer.evaluators.latency import LatencySettings, make_latency_source
    from slimformer.export.bench import cpu_model
    from slimformer.fileio import read_json
    from slimformer.search.report_bench import FrontBench, MeasuredPlan, write_front_bench
    from slimformer.search.results import ParetoFront
    from slimformer.search.rundir import latency_note

    entries = ParetoFront.from_json(read_json(run_dir / "pareto.json", {})).trials
    top = sorted(entries, key=lambda e: -e.heldout_metrics[ctx.quality_metric])[:n]
    lat = ctx.config.latency
    threads = min(latency_note(ctx, lat.source, "").threads, os.cpu_count() or 1)
    roofline = make_latency_source("estimate", LatencySettings(ctx.profile, lat.batch, lat.seq))
    say = log or (lambda _msg: None)
    plans = []
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    for i, e in enumerate(top, 1):
        say(f"bench {i}/{len(top)}: trial {e.trial} ({e.recipe})")
        res = bench(run_dir / e.recipe, ctx.config.model, data=ctx.config.data.source,
                    samples=ctx.config.data.heldout_samples, threads=threads, seqs=(lat.seq,),
                    batches=(lat.batch,), runs=runs, log=log, kernels=lat.kernels)
        rl = roofline.price(ctx.adapter, ctx.space.plan_from_params(e.params)).ms
        plans.append(MeasuredPlan.of(e.trial, e.recipe, e.latency_ms_estimate, rl, res))
        write_front_bench(run_dir, FrontBench(lat.batch, res.seqs[0], threads, lat.kernels, cpu_model(),
                                              ort.__version__, res.date, plans, load, os.cpu_count() or 0))
    return entries
