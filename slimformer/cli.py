"""`slimformer` command line: parses arguments, calls slimformer.api, prints. Bad input exits with 2.

Nothing heavy is imported at module level (each command imports slimformer.api when it runs), so `--help`
and `--version` answer in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slimformer import __version__
from slimformer.cli_errors import (
    MAX_SAMPLES,
    MAX_THREADS,
    MAX_TRIALS,
    json_option,
    no_progress_option,
    progress_logger,
    write_json_out,
)
from slimformer.cli_errors import errors as _errors
from slimformer.cli_errors import int_list as _int_list


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimformer")
@click.option("--verbose", "-v", is_flag=True,
              help="Show third-party logs and warnings (Optuna, Ray, transformers) that are hidden by default.")
def main(verbose: bool) -> None:
    """Hardware-aware compression search for Transformers (rank, sparsity, bits, sharing)."""


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trials", type=click.IntRange(min=1, max=MAX_TRIALS), help="Total trials in the study (resumes count).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop starting trials after S seconds.")
@click.option("--storage", help="Optuna storage URL (default: SQLite in the run directory).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@no_progress_option
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Run trials in this process, or in Ray workers running slimformer's own trial loop on one "
                   "shared Optuna study (not Ray Tune: for a Tuner use slimformer.search.tune, docs/CLI.md).")
@click.option("--address", help="Ray cluster to join (with --backend ray; needs a database --storage).")
@click.option("--workers", type=click.IntRange(min=1, max=MAX_THREADS),
              help="Ray workers (with --backend ray; default: CPUs).")
@_errors
def search(config: Path | None, trials: int | None, timeout: float | None, storage: str | None,
           run_dir: Path | None, no_progress: bool, backend: str, address: str | None, workers: int | None) -> None:
    """Search compression plans under a memory budget. CONFIG defaults to the embedded Quickstart.

    Several processes given one --storage URL (postgresql://..., journal:PATH) and study work on one study.
    """
    from slimformer.api import search as run
    from slimformer.models.metrics import format_quality

    res = run(config, trials=trials, timeout=timeout, storage=storage, run_dir=run_dir,
              progress=not no_progress, log=progress_logger(no_progress), backend=backend,
              address=address, workers=workers)
    s = res.summary
    m = s.quality_metric
    click.echo(f"run directory: {res.run_dir}")
    click.echo(f"trials: {s.trial_states} ({s.infeasible_trials} over budget, not evaluated)")
    if s.best_recipe:
        click.echo(f"best recipe: {res.run_dir / s.best_recipe.recipe}  {s.best_recipe.memory_percent:.2f}% of fp32, "
                   f"held-out {m} {format_quality(s.best_recipe.heldout_quality)}")
    if s.best_baseline:
        click.echo(f"best uniform baseline in budget: {s.best_baseline.name}  "
                   f"{s.best_baseline.memory_percent:.2f}% of fp32, "
                   f"held-out {m} {format_quality(s.best_baseline.heldout_quality)}")
    click.echo(f"report: {res.run_dir / 'report.html'}")


_KERNELS_OPTION = click.option(
    "--kernels", type=click.Choice(["exact", "fast"]), default=None,
    help="Override every unit's ONNX kernel: exact (bit-faithful weight-only kernels) or fast (int8 GEMMs, "
         "activations quantised, SmoothQuant). Default: each unit's recipe kernel (exact, or int8 where it says so).")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Model directory or id the recipe is applied to.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write the compressed model here.")
@click.option("--data", default="fortunes", show_default=True, help="Held-out data for the fidelity check.")
@click.option("--samples", default=256, show_default=True, type=click.IntRange(min=2, max=MAX_SAMPLES),
              help="Held-out samples the fidelity is measured on.")
@click.option("--onnx", "to_onnx", is_flag=True, help="Also write OUT/onnx/model.onnx (needs --out).")
@_KERNELS_OPTION
@click.option("--recover", "do_recover", is_flag=True,
              help="Distil the compressed model from the uncompressed one before measuring and saving (with the "
              "recovery settings the recipe records, if any; the options below override them).")
@click.option("--steps", type=click.IntRange(min=1, max=MAX_TRIALS), help="Recovery optimizer steps (default 300).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="Recovery wall-time budget instead.")
@click.option("--recover-data", help="Recovery training data (default: debian-fortunes when Debian's fortunes "
              "package is installed, else the packaged fortunes; fashion-mnist for a ViT); held-out texts are "
              "excluded.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Recovery learning rate (default 5e-4).")
@no_progress_option
@_errors
def apply(recipe: Path, model: str, out: Path | None, data: str, samples: int, to_onnx: bool, kernels: str | None,
          do_recover: bool, steps: int | None, minutes: float | None, recover_data: str | None,
          lr: float | None, no_progress: bool) -> None:
    """Apply RECIPE to a model, print memory and fidelity, and optionally save it (--recover: distil first)."""
    from slimformer.api import apply_recipe
    from slimformer.errors import ConfigError

    recover = None
    if do_recover:  # the recipe's recorded recovery settings (if any) are the defaults
        from slimformer.compression.recipe import Recipe
        from slimformer.recovery import RecoveryConfig

        recorded = Recipe.load(recipe).recovery
        recover = RecoveryConfig.from_recorded(None if recorded is None else recorded.settings, "--recover",
                                               steps=steps, minutes=minutes, data=recover_data, lr=lr)
    elif any(v is not None for v in (steps, minutes, recover_data, lr)):
        raise ConfigError("--steps, --minutes, --recover-data and --lr set recovery; add --recover")
    res = apply_recipe(recipe, model, out_dir=out, data=data, samples=samples, onnx=to_onnx, kernels=kernels,
                       recover=recover, progress=not no_progress, log=progress_logger(no_progress))
    mem = res.memory
    target = " (deploy onnx: upper bound of onnx/model.onnx)" if mem.deploy == "onnx" else ""
    click.echo(f"memory: {mem.total_bytes:,d} bytes = {mem.percent:.2f}% of fp32 ({mem.fp32_bytes:,d}){target}")
    if res.recovery is not None:
        r = res.recovery
        before = ", ".join(f"{k} {v:.4f}" for k, v in r.before.items())
        click.echo(f"recovery: {r.steps} steps in {r.seconds:.0f} s on {r.device}, {r.train_samples} training "
                   f"samples; held-out before recovery: {before}")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in res.fidelity.items())
    click.echo(f"fidelity on {res.n_samples} held-out samples: {scores}")
    if res.out_dir:
        click.echo(f"wrote {res.out_dir}")
    if res.onnx is not None:
        _echo_onnx(res.onnx)


def _echo_onnx(o: Any) -> None:
    click.echo(f"wrote {o.path} ({o.kernels} kernels): {o.file_bytes:,d} bytes on disk, {o.resident_bytes:,d} "
               f"resident weight bytes; ONNX vs torch: mean cosine {o.cosine:.6f}, max abs diff {o.max_abs_diff:.2e}")


@main.command("export")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file (default MODEL_DIR/onnx/model.onnx).")
@_KERNELS_OPTION
@no_progress_option
@_errors
def export_cmd(model_dir: Path, out: Path | None, kernels: str | None, no_progress: bool) -> None:
    """Export a compressed model directory (from `apply --out`) to ONNX with physical int4/int8 kernels."""
    from slimformer.api import export_model

    _echo_onnx(export_model(model_dir, out, kernels=kernels, log=progress_logger(no_progress)))


@main.command("bench")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--model", help="Uncompressed model (needed for a recipe or an .onnx TARGET).")
@click.option("--data", default="fortunes", show_default=True, help="Held-out data for fidelity and inputs.")
@click.option("--samples", default=256, show_default=True, type=click.IntRange(min=2, max=MAX_SAMPLES),
              help="Held-out samples for the fidelity columns.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1, max=MAX_THREADS),
              help="Intra-op threads.")
@click.option("--seq", "seqs", default="64,128", show_default=True, callback=_int_list,
              help="Sequence lengths, comma-separated.")
@click.option("--batch", "batches", default="1,32", show_default=True, callback=_int_list,
              help="Batch sizes, comma-separated.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1, max=MAX_SAMPLES),
              help="Timed runs per model.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0, max=MAX_SAMPLES),
              help="Untimed runs per model before timing.")
@click.option("--optimized-baseline", is_flag=True,
              help="Also time ORT's strongest int8: eager-attention export fused by onnxruntime.transformers."
                   "optimizer, then dynamic int8 per channel.")
@click.option("--recover", "do_recover", is_flag=True,
              help="Recipe TARGET: distil the applied recipe with its recorded recovery settings (else the defaults) "
                   "before timing, so the fidelity columns are the recovered model's; latency does not depend on it.")
@json_option
@_KERNELS_OPTION
@no_progress_option
@_errors
def bench(target: Path, model: str | None, data: str, samples: int, threads: int, seqs: tuple[int, ...],
          batches: tuple[int, ...], runs: int, warmup: int, optimized_baseline: bool, do_recover: bool,
          json_out: str | None,
          kernels: str | None, no_progress: bool) -> None:
    """Benchmark TARGET (recipe, compressed directory or .onnx) against fp32 and ORT dynamic int8 in ONNX Runtime."""
    from slimformer.api import bench as run
    from slimformer.fileio import check_output_path

    if json_out is not None:
        check_output_path(json_out, "--json")
    recover = None
    if do_recover:  # a recipe's recorded settings; a directory or .onnx TARGET is refused by api.bench
        from slimformer.compression.recipe import Recipe
        from slimformer.recovery import RecoveryConfig

        is_recipe = target.is_file() and target.suffix.lower() != ".onnx"
        recorded = Recipe.load(target).recovery if is_recipe else None
        recover = RecoveryConfig.from_recorded(None if recorded is None else recorded.settings, "--recover")
    res = run(target, model, data=data, samples=samples, threads=threads, seqs=seqs, batches=batches, runs=runs,
              warmup=warmup, log=progress_logger(no_progress), kernels=kernels, optimized_baseline=optimized_baseline,
              recover=recover)
    rec = res.extra.get("recovery")
    if rec is not None and json_out != "-":
        click.echo(f"recovery: {rec['steps']} steps in {rec['seconds']:.0f} s; held-out {rec['before']} before, "
                   f"{rec['after']} after (the target's fidelity column)")
    if json_out != "-":
        click.echo(res.format())
    if json_out is not None:
        write_json_out(json_out, res.to_dict())


@main.command("export-recipe")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trial", required=True, type=int, help="Trial number.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="File to write (default: stdout).")
@_errors
def export_recipe(run_dir: Path, trial: int, out: Path | None) -> None:
    """Write the recipe of one trial of a run."""
    from slimformer.api import export_recipe as export

    rec = export(run_dir, trial, out)
    if out is None:
        click.echo(rec.to_yaml(), nl=False)
    else:
        click.echo(f"wrote {out}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bench", "bench_n", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also export the N Pareto plans with the best held-out quality to ONNX (temporary folder) and "
                   "time them here, at the search's batch x seq and threads, beside the predicted latency and the "
                   "roofline estimate (bench.json, and a table in the report). 0 exports nothing.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1, max=MAX_SAMPLES),
              help="Timed runs per plan with --bench.")
@no_progress_option
@_errors
def report(run_dir: Path, bench_n: int, runs: int, no_progress: bool) -> None:
    """Rebuild pareto.json, recipes, pareto.png and report.html of a run from its study (--bench N: measure)."""
    from slimformer.api import report as rebuild

    out = rebuild(run_dir, bench=bench_n, runs=runs, log=progress_logger(no_progress))
    if bench_n:
        from slimformer.search.report_bench import read_front_bench

        fb = read_front_bench(run_dir)
        for p in fb.plans if fb else []:
            click.echo(f"trial {p.trial}: measured {p.measured_ms:.2f} ms (batch {fb.batch} x seq {fb.seq}, "  # type: ignore[union-attr]
                       f"{fb.threads} thread(s)); predicted {p.predicted_ms:.2f} ms (x{p.over_predicted:.2f}), "  # type: ignore[union-attr]
                       f"roofline {p.roofline_ms:.2f} ms (x{p.over_roofline:.2f}); x{p.ratio_to_fp32:.2f} fp32")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model")
@json_option
@_errors
def inspect(model: str, json_out: str | None) -> None:
    """List MODEL's compressible units and its memory breakdown."""
    from dataclasses import asdict

    from slimformer.api import inspect_model

    rep = inspect_model(model)
    if json_out != "-":
        click.echo(rep.format())
    if json_out is not None:
        write_json_out(json_out, {"model": rep.model_id, "units": [asdict(u) for u in rep.units],
                                  "memory": rep.memory.by_group, "total_bytes": rep.memory.total_bytes})


from slimformer.cli_profiles import calibrate_cmd, profile_group  # noqa: E402

main.add_command(calibrate_cmd)
main.add_command(profile_group)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="slimformer")
