"""`slimformer calibrate` and `slimformer profile validate|show`: thin click commands over
hardware_profiles/calibrate.py and validate.py (registered on the main CLI group in slimformer/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from slimformer.cli_errors import MAX_SAMPLES, MAX_THREADS, no_progress_option, progress_logger
from slimformer.cli_errors import errors as _errors
from slimformer.cli_errors import int_list as _ints
from slimformer.errors import ConfigError

BENCH_DOC = Path("docs/BENCHMARKS.md")
RESULTS_DIR = Path("benchmarks/results")


@click.command("calibrate")
@click.option("--runtime", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True,
              help="Inference runtime whose kernels are measured.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=1, show_default=True,
              help="Intra-op threads.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Profile YAML to write.")
@click.option("--quick", is_flag=True, help="A short run planned into 3 minutes (fewer shapes and passes; both "
              "reference models): good enough to steer a search; the full run is planned into 9.")
@click.option("--name", help="Profile name (default: from CPU, ISA, threads and runtime).")
@click.option("--m", "m_values", callback=_ints, help="Override the token counts M measured (e.g. 1,128).")
@click.option("--dims", callback=_ints, help="Override the K/N widths measured (e.g. 96,384).")
@click.option("--references", help="Comma-separated reference models for the residual ('none' for none).")
@no_progress_option
@click.option("--refit-residual", "refit_from", help="Keep this profile's kernel tables; only re-time the "
              "reference models and re-fit the whole-graph residual.")
@_errors
def calibrate_cmd(runtime: str, threads: int, out: Path, quick: bool, name: str | None,
                  m_values: tuple[int, ...] | None, dims: tuple[int, ...] | None, references: str | None,
                  no_progress: bool, refit_from: str | None) -> None:
    """Measure this device's onnxruntime kernels and write a calibrated hardware profile."""
    import tempfile
    from dataclasses import replace

    from slimformer.fileio import check_output_path
    from slimformer.hardware_profiles.calibrate import CalibrationGrid, calibrate
    from slimformer.hardware_profiles.profile import load_profile, save_profile

    del runtime  # one runtime today; the option fixes the CLI for more
    check_output_path(out, "--out")
    if refit_from is not None:
        from slimformer.hardware_profiles.residual_fit import refit

        refs = CalibrationGrid.full().references if references is None else tuple(
            r.strip() for r in references.split(",") if r.strip() and r.strip() != "none")
        with tempfile.TemporaryDirectory() as tmp:
            profile = refit(load_profile(refit_from), refs, Path(tmp), log=progress_logger(no_progress))
        save_profile(profile, out)
        click.echo(f"{profile.name} ({profile.version}): residual re-fitted on {', '.join(refs)} -> {out}")
        return
    grid = CalibrationGrid.quick() if quick else CalibrationGrid.full()
    if m_values:
        grid = replace(grid, m_values=tuple(sorted(set(m_values))))
    if dims:
        grid = replace(grid, dims=tuple(sorted(set(dims))))
    if references is not None:
        refs = tuple(r.strip() for r in references.split(",") if r.strip() and r.strip() != "none")
        grid = replace(grid, references=refs)
    say = progress_logger(no_progress) or (lambda _m: None)
    profile = calibrate(threads, grid, name=name, progress=not no_progress, log=say)
    save_profile(profile, out)
    cal = profile.calibration
    click.echo(f"{profile.name} ({profile.version}): {len(profile.latency_model.linear)} linear kernel classes, "
               f"{cal.measurements if cal else 0} measurements in {cal.seconds if cal else 0:.0f} s (budget "
               f"{cal.budget_seconds if cal and cal.budget_seconds else 0:.0f} s), noise "
               f"{100 * (profile.noise.median_rel_iqr if profile.noise else 0):.1f}% -> {out}")


@click.group("profile")
def profile_group() -> None:
    """Inspect and validate hardware profiles."""


@profile_group.command("show")
@click.argument("profile")
@_errors
def show_cmd(profile: str) -> None:
    """Print a profile's identity, machine numbers and validation results."""
    from slimformer.hardware_profiles.profile import load_profile

    p = load_profile(profile)
    click.echo(f"{p.name} {p.version}: {p.cpu}, {p.threads} thread(s), {p.runtime} {p.runtime_version}, "
               f"calibrated={p.calibrated}")
    for v in p.validation:
        click.echo(f"  {v.model} b{v.batch} s{v.seq}: MAPE {100 * v.mape:.1f}%, within 10% {100 * v.within_10:.0f}%, "
                   f"tau {v.kendall_tau:.3f}, noise {100 * v.noise_floor:.1f}% (FLOPs proxy MAPE "
                   f"{100 * v.flops_mape:.1f}%, tau {v.flops_kendall_tau:.3f})")


@profile_group.command("validate")
@click.argument("profile")
@click.option("--model", required=True, help="Model id/dir, or vit-fmnist (the Fashion-MNIST ViT geometry).")
@click.option("--configs", default=60, show_default=True, type=click.IntRange(min=2, max=MAX_SAMPLES),
              help="Random held-out plans.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS),
              help="Intra-op threads (default: the profile's).")
@click.option("--batch", "batches", default="1", show_default=True, callback=_ints,
              help="Batch sizes, comma-separated (each batch x seq pair is validated).")
@click.option("--seq", "seqs", callback=_ints,
              help="Sequence lengths, comma-separated (default 128; a ViT's token count).")
@click.option("--runs", default=15, show_default=True, type=click.IntRange(min=3, max=MAX_SAMPLES),
              help="Rounds per timing pass (at least; fast models get more, up to 400, so a pass lasts 20 s).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random held-out plans.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the exported models here.")
@click.option("--write", is_flag=True, help="Also write the result into the profile file, benchmarks/results/ and "
              "docs/BENCHMARKS.md (run from the repository root); by default nothing is written.")
@click.option("--no-write", is_flag=True, hidden=True, help="The default (kept for old scripts).")
@no_progress_option
@_errors
def validate_cmd(profile: str, model: str, configs: int, threads: int | None, batches: tuple[int, ...],
                 seqs: tuple[int, ...] | None, runs: int, seed: int, work_dir: Path | None, write: bool,
                 no_write: bool, no_progress: bool) -> None:
    """Measure random held-out plans and report the calibrated model's error next to the FLOPs proxy's."""
    import tempfile

    from slimformer.fileio import check_output_path
    from slimformer.hardware_profiles.profile import load_profile, resolve_path, save_profile
    from slimformer.hardware_profiles.references import reference_adapter
    from slimformer.hardware_profiles.validate import results_stem, rows_json, validate, with_result

    if write and no_write:
        raise ConfigError("--write and --no-write contradict each other; pass one")
    prof = load_profile(profile)
    if write:  # every output checked before the minutes of timing
        if not BENCH_DOC.is_file():
            raise ConfigError(f"--write: {BENCH_DOC} does not exist; run from the repository root or drop --write")
        check_output_path(resolve_path(profile), "--write: profile")
        check_output_path(RESULTS_DIR / "x.json", "--write: results directory")
    if work_dir is not None:
        check_output_path(work_dir, "--work-dir", kind="dir")
    threads = threads or prof.threads
    adapter = reference_adapter(model)
    pairs = [(b, s) for b in batches for s in (seqs or (adapter.default_latency_seq,))]
    say = progress_logger(no_progress) or (lambda _m: None)
    lines, outs = [], []
    for batch, seq in pairs:
        with tempfile.TemporaryDirectory() as tmp:
            result, rows = validate(prof, adapter, configs, batch, seq, threads, work_dir or Path(tmp), seed=seed,
                                    runs=runs, log=say)
        line = _result_line(model, batch, seq, threads, result)
        click.echo(line)
        lines.append(line)
        prof = with_result(prof, result)
        stem = results_stem(prof.name, model) + ("" if len(pairs) == 1 else f"-b{batch}-s{seq}")
        outs.append((RESULTS_DIR / f"{stem}.json", rows_json(result, rows, threads)))
    if not write:
        return
    path = resolve_path(profile)
    shown = path.resolve().relative_to(Path.cwd()) if path.resolve().is_relative_to(Path.cwd()) else path
    save_profile(prof, path)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    from slimformer.fileio import atomic_write

    for out, payload in outs:
        atomic_write(out, json.dumps(payload, indent=1))
    body = "\n\n".join(lines)
    files = ", ".join(f"`{out}`" for out, _ in outs)
    update_bench_doc(f"profile-validate-{adapter.doc_label}",
                     f"`slimformer profile validate {profile} --model {model} --configs {configs}`\n\n{body}\n\n"
                     f"Results: {files}; profile validation section updated (`{shown}`); calibration "
                     f"took {prof.calibration.seconds if prof.calibration else 0:.0f} s "
                     f"(`{prof.calibration.command if prof.calibration else 'unknown'}`).")
    click.echo(f"wrote {path}, {', '.join(str(o) for o, _ in outs)}, {BENCH_DOC}")


def _result_line(model: str, batch: int, seq: int, threads: int, result: Any) -> str:
    """One validation result as the line printed and written into docs/BENCHMARKS.md."""
    return (f"{model} batch {batch} seq {seq}, {result.configs} held-out plans, {threads} thread(s): "
            f"MAPE {100 * result.mape:.2f}%, within 5% {100 * result.within_5:.0f}%, within 10% "
            f"{100 * result.within_10:.0f}%, p95 {100 * result.p95_error:.1f}%, Kendall tau {result.kendall_tau:.3f}; "
            f"FLOPs proxy MAPE {100 * result.flops_mape:.2f}%, within 10% {100 * result.flops_within_10:.0f}%, "
            f"tau {result.flops_kendall_tau:.3f}; roofline estimate MAPE {100 * (result.estimate_mape or 0):.1f}%, "
            f"tau {result.estimate_kendall_tau or 0:.3f}; noise floor {100 * result.noise_floor:.2f}%; "
            f"load {result.loadavg}")


def update_bench_doc(marker: str, body: str, doc: Path = BENCH_DOC) -> None:
    """Replace the text between `<!-- marker:begin -->` and `<!-- marker:end -->` (appended when absent)."""
    from slimformer.fileio import atomic_write

    if not doc.is_file():
        raise ConfigError(f"{doc} does not exist; run from the repository root or drop --write")
    text = doc.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(doc, text)
