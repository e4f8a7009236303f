"""report.html: the verdict (best plan vs best uniform baseline), next-step commands, every Pareto plan with its
recipe link and per-layer choices, the baselines, trial states in words and where latency numbers come from.

Everything dynamic is escaped (`html.escape`); the page is one self-contained file (pareto.png inlined).
`ReportInputs` holds what the page shows, so it can be rendered (and tested) without a search context.
"""

from __future__ import annotations

import base64
import html
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer.fileio import atomic_write
from slimformer.models.metrics import format_quality
from slimformer.search.report_bench import FrontBench
from slimformer.search.report_html import Raw, details, sortable_table, trial_states_text
from slimformer.search.results import BaselineResult, ParetoEntry, SearchSummary

__all__ = ["LatencyNote", "ReportInputs", "UnitSlot", "next_steps", "per_layer_table", "write_report"]


@dataclass(frozen=True)
class UnitSlot:
    """One compressible unit's place in the per-layer table."""

    name: str
    role: str
    layer: int | None


@dataclass(frozen=True)
class LatencyNote:
    """What priced the latency numbers, and on which machine (profile's CPU vs the CPU writing the report)."""

    source: str  # calibrated | estimate | measured (the resolved latency.source)
    label: str  # the summary's latency_label
    profile: str
    profile_version: str | None
    profile_cpu: str
    profile_threads: int
    profile_runtime: str  # e.g. "onnxruntime 1.32.0"
    this_cpu: str
    mismatch: str | None  # hardware_profiles.machine.mismatch: None when this machine matches the profile
    batch: int
    seq: int
    threads: int  # the threads the numbers are for (deployment threads, else the profile's)
    kernels: str


@dataclass(frozen=True)
class ReportInputs:
    """Everything report.html shows."""

    run_dir: str  # as the user gave it: the next-step commands use it
    model: str
    metric: str
    metrics: list[str]  # every held-out metric name
    objectives: list[str]
    budget_bytes: int
    fp32_bytes: int
    entries: list[ParetoEntry]
    baselines: list[BaselineResult]
    summary: SearchSummary
    units: list[UnitSlot]
    layers: list[int]
    latency: LatencyNote
    measured: FrontBench | None = None


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _out_dir_name(model: str, trial: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1].split(":")[-1]).strip("-.") or "model"
    return f"{stem}-trial-{trial}"


def _latency_kind(source: str) -> str:
    return {"calibrated": "predicted", "estimate": "roofline estimate", "measured": "measured"}.get(source, source)


def _best_baseline(inp: ReportInputs) -> BaselineResult | None:
    best = inp.summary.best_baseline
    return None if best is None else next((b for b in inp.baselines if b.name == best.name), None)


def verdict(inp: ReportInputs) -> str:
    """The headline: best plan vs best uniform baseline in the budget (size, held-out quality, latency)."""
    m, s = inp.metric, inp.summary
    best = next((e for e in inp.entries if s.best_recipe and e.trial == s.best_recipe.trial), None)
    if best is None:
        return "<p class='verdict'>No plan within the budget was evaluated: no recipe to recommend.</p>"
    kind = _latency_kind(inp.latency.source)
    base = _best_baseline(inp)
    q = best.heldout_metrics[m]
    rows: list[list[Any]] = [[Raw(f"<b>best plan: trial {best.trial}</b>"), _mb(best.memory_bytes),
                              f"{best.memory_percent:.2f}", format_quality(q), f"{best.latency_ms_estimate:.2f}"]]
    if base is not None and base.heldout_metrics:
        qb = base.heldout_metrics[m]
        rows.append([f"best uniform baseline: {base.name}", _mb(base.memory_bytes), f"{base.memory_percent:.2f}",
                     format_quality(qb), "" if base.latency_ms is None else f"{base.latency_ms:.2f}"])
        diff = q - qb
        sign = "+" if diff >= 0 else ""
        word = "beats" if diff >= 5e-5 else "matches" if diff > -5e-5 else "does not beat"
        lat = ""
        if base.latency_ms:
            lat = f", {kind} latency {best.latency_ms_estimate / base.latency_ms:.2f}x the baseline's"
        sentence = (f"Trial {best.trial} {word} the best uniform baseline ({base.name}) on held-out data: "
                    f"{m} {format_quality(q)} vs {format_quality(qb)} ({sign}{format_quality(diff)}), "
                    f"at {_mb(best.memory_bytes)} MB vs "
                    f"{_mb(base.memory_bytes)} MB{lat}.")
    else:
        sentence = (f"Trial {best.trial}: held-out {m} {format_quality(q)} at {_mb(best.memory_bytes)} MB "
                    f"({best.memory_percent:.2f}% of fp32); no uniform baseline fits the budget.")
    table = sortable_table(["", "size MB", "% of fp32", f"held-out {m}", f"latency ms ({kind})"], rows,
                           sortable=False)
    return f"<p class='verdict'>{_esc(sentence)}</p>{table}"


def next_steps(inp: ReportInputs) -> list[tuple[str, str]]:
    """(what, command) pairs to copy: apply + ONNX, bench, measure the front, calibrate here, recover."""
    s, lat = inp.summary, inp.latency
    if s.best_recipe is None:
        return []
    rd, n = inp.run_dir, s.best_recipe.trial
    recipe = shlex.quote(f"{rd.rstrip('/')}/{s.best_recipe.recipe}")
    out = shlex.quote(_out_dir_name(inp.model, n))
    model = shlex.quote(inp.model)
    fast = " --kernels fast" if lat.kernels == "fast" else ""
    steps = [
        (f"Apply the best plan (trial {n}) and export ONNX with onnxruntime's low-bit kernels:",
         f"slimformer apply {recipe} --model {model} --out {out} --onnx{fast}"),
        ("Time it against fp32 and onnxruntime's dynamic int8 on this machine, at the search's shape:",
         f"slimformer bench {out} --threads {lat.threads} --batch {lat.batch} --seq {lat.seq}{fast}"),
        ("Measure the 3 best plans' real latency next to the prediction (written into this report):",
         f"slimformer report {shlex.quote(rd)} --bench 3"),
        ("Recover quality by distilling the compressed model from the original (15 minutes):",
         f"slimformer apply {recipe} --model {model} --out {out}-rec --recover --minutes 15 --onnx{fast}"),
    ]
    if lat.source != "measured" and lat.mismatch:
        steps.append(("Latency was priced for another machine: calibrate this one, then search with "
                      "`hardware_profile: this-machine.yaml` in a new run directory:",
                      f"slimformer calibrate --threads {lat.threads} --out this-machine.yaml"))
    steps.append(("Any other plan: every Pareto recipe is linked in the table below; any evaluated trial:",
                  f"slimformer export-recipe {shlex.quote(rd)} --trial N --out trial-N.yaml"))
    return steps


def shell_lines(cmd: str, width: int = 96) -> str:
    """`cmd` broken before options into lines ending in ` \\` once it is longer than `width` (still one command
    when pasted into a shell; tokens are re-quoted, so a quoted argument is never split)."""
    if len(cmd) <= width:
        return cmd
    lines: list[str] = []
    for tok in (shlex.quote(t) for t in shlex.split(cmd)):
        if lines and (tok.startswith("--") and len(lines[-1]) + len(tok) + 1 > width):
            lines.append("    " + tok)
        elif lines:
            lines[-1] += " " + tok
        else:
            lines.append(tok)
    return " \\\n".join(lines)


def latency_text(lat: LatencyNote) -> str:
    """Where the latency numbers come from, said honestly (the profile's machine vs this one)."""
    shape = f"batch {lat.batch} x seq {lat.seq}, {lat.threads} thread(s)"
    prof = f"hardware profile <b>{_esc(lat.profile)}</b> ({_esc(lat.profile_version or 'no version')})"
    made = (f"made on CPU <b>{_esc(lat.profile_cpu)}</b> with {lat.profile_threads} thread(s), "
            f"{_esc(lat.profile_runtime)}")
    if lat.source == "measured":
        text = (f"Latency was <b>measured</b> during the search: each in-budget plan's ONNX export timed in "
                f"onnxruntime ({_esc(shape)}, {_esc(lat.kernels)} kernels); plans over the budget carry the "
                f"roofline estimate of {prof}.")
    elif lat.source == "calibrated":
        text = (f"Latency is <b>predicted, not measured</b>: the calibrated onnxruntime kernel model of {prof}, "
                f"{made}, priced at {_esc(shape)}.")
    else:
        text = (f"Latency is a <b>roofline estimate, neither measured nor calibrated</b>: peak GFLOP/s and memory "
                f"bandwidth of {prof}, {made}, at {_esc(shape)}.")
    here = f"This report was written on CPU <b>{_esc(lat.this_cpu)}</b>."
    if lat.source != "measured" and lat.mismatch:
        warn = (f"<p class='warn'>{_esc(lat.mismatch)}. The numbers describe the profile's machine, not this one; "
                "the order of plans usually transfers better than absolute milliseconds. "
                "<code>slimformer report RUN --bench N</code> measures them here.</p>")
    elif lat.source != "measured":
        warn = "<p>This machine matches the profile (CPU, runtime, threads).</p>"
    else:
        warn = ""
    return f"<p>{text} {here}</p>{warn}<p class='small'>label: {_esc(lat.label)}</p>"


def front_table(inp: ReportInputs) -> str:
    """Every Pareto plan (sortable): memory, latency, search and held-out quality, recipe link."""
    m, s = inp.metric, inp.summary
    others = [k for k in inp.metrics if k != m]
    kind = _latency_kind(inp.latency.source)
    recovered = {r.trial: r.after for r in s.recovery.trials} if s.recovery else {}
    best = s.best_recipe.trial if s.best_recipe else None
    rows = []
    for e in sorted(inp.entries, key=lambda e: e.memory_bytes):
        mp = inp.measured.of_trial(e.trial) if inp.measured else None
        star = " ★" if e.trial == best else ""
        row: list[Any] = [Raw(f"<a href='#trial-{e.trial}'>{e.trial}</a>{star}"), _mb(e.memory_bytes),
                          f"{e.memory_percent:.2f}", f"{e.latency_ms_estimate:.2f}"]
        if inp.measured is not None:
            row.append("" if mp is None else f"{mp.measured_ms:.2f}")
        row += [_num(e.search_metrics.get(m)), _num(e.heldout_metrics.get(m)),
                *[_num(e.heldout_metrics.get(k)) for k in others]]
        if recovered:
            row.append(_num(recovered.get(e.trial)))
        row.append(Raw(f"<a href='{_esc(e.recipe)}'>{_esc(e.recipe)}</a>"))
        rows.append(row)
    head = ["trial", "MB", "% of fp32", f"latency ms ({kind})"]
    if inp.measured is not None:
        head.append("measured ms")
    head += [f"search {m}", f"held-out {m}", *[f"held-out {k}" for k in others]]
    if recovered:
        head.append(f"held-out {m} after recovery")
    head.append("recipe")
    return sortable_table(head, rows)


def _num(v: float | None) -> str:
    return "" if v is None else format_quality(v)


def baseline_table(inp: ReportInputs) -> str:
    m = inp.metric
    others = [k for k in inp.metrics if k != m]
    kind = _latency_kind(inp.latency.source)
    rows = [[b.name, _mb(b.memory_bytes), f"{b.memory_percent:.2f}",
             "yes" if b.fits else f"no ({b.over_budget or 'memory'})",
             "" if b.latency_ms is None else f"{b.latency_ms:.2f}", _num((b.search_metrics or {}).get(m)),
             _num((b.heldout_metrics or {}).get(m)), *[_num((b.heldout_metrics or {}).get(k)) for k in others],
             b.error or ""] for b in inp.baselines]
    return sortable_table(["baseline", "MB", "% of fp32", "fits budget", f"latency ms ({kind})", f"search {m}",
                           f"held-out {m}", *[f"held-out {k}" for k in others], "error"], rows)


def measured_section(inp: ReportInputs) -> str:
    """`report --bench N`: measured beside predicted latency and the roofline ratio."""
    fb = inp.measured
    front = {e.trial for e in inp.entries}
    if fb is None or not any(p.trial in front for p in fb.plans):
        return ("<p>No plan of this front has been measured. <code>slimformer report RUN --bench N</code> exports "
                "the N best plans to ONNX and times them here.</p>")
    kind = _latency_kind(inp.latency.source)
    metric = next(iter(fb.plans[0].fidelity), "cosine")
    rows = [[p.trial, f"{p.predicted_ms:.2f}", f"{p.measured_ms:.2f}", f"{p.measured_q1_ms:.2f}–{p.measured_q3_ms:.2f}",
             f"{p.over_predicted:.2f}", f"{p.roofline_ms:.2f}", f"{p.over_roofline:.2f}", f"{p.fp32_ms:.2f}",
             f"{p.ratio_to_fp32:.2f}", _mb(p.file_bytes), _num(p.fidelity.get(metric))]
            for p in fb.plans if p.trial in front]
    table = sortable_table(["trial", f"{kind} ms", "measured ms (median)", "IQR ms", "measured / predicted",
                            "roofline ms", "measured / roofline", "fp32 ms", "x fp32", "model.onnx MB",
                            f"ONNX {metric} vs fp32"], rows)
    warn, load = "", ""
    if fb.busy:
        warn = (f"<p class='warn'>Measured on a busy machine (load average {fb.loadavg[0]:.1f} on {fb.cpus} CPUs): "
                "these timings are inflated; rerun <code>report --bench</code> on an idle machine.</p>")
    elif fb.loadavg:
        load = f" Load average {fb.loadavg[0]:.1f} on {fb.cpus or '?'} CPUs when the timing began."
    return (f"{warn}<p>Measured by <code>slimformer report --bench</code> on {_esc(fb.date)}: CPU {_esc(fb.cpu)}, "
            f"onnxruntime {_esc(fb.onnxruntime)}, {fb.threads} thread(s), batch {fb.batch} x seq {fb.seq}, "
            f"{_esc(fb.kernels)} kernels; median of timed runs, alternating with the fp32 export (x fp32 is the "
            f"median of per-round ratios). The roofline estimate is a lower-bound model of the same plan (profile "
            f"peak rate and bandwidth): measured / roofline says how far the kernels are from it.{load}</p>{table}")


_NOTATION = ("intN gG: N-bit integer weights, one scale per G inputs (per output channel without g); rtn / gptq: "
             "how the weights were rounded (round-to-nearest with a clipping search / GPTQ error compensation); "
             "rR: low rank R; sP: share P of weights pruned; 2:4: semi-structured sparsity; kernel: the ONNX "
             "kernel the unit exports to, when the plan fixes it; fp32: unchanged. heads/neurons: structured "
             "pruning (kept counts).")


def _spec_text(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "fp32"
    if spec.get("tiers"):  # a frequency-tiered embedding table
        return f"tiers {spec['tiers']}"
    parts = []
    if spec.get("rank"):
        parts.append(f"r{spec['rank']}")
    if spec.get("sparsity"):
        parts.append("2:4" if spec.get("pattern") == "2:4" else f"s{spec['sparsity']:.2f}")
    bits = spec.get("bits", 32)
    if bits in (8, 4, 3, 2):
        parts.append(f"int{bits}" + (f" g{spec['group_size']}" if spec.get("group_size") else ""))
        parts.append(str(spec.get("method") or "rtn"))
    elif bits != 32 or not parts:
        parts.append(f"fp{bits}")
    if spec.get("kernel"):
        parts.append(f"kernel {spec['kernel']}")
    return " ".join(parts)


def per_layer_table(inp: ReportInputs, entry: ParetoEntry) -> str:
    """Rows = embeddings and layers, columns = roles; each cell the unit's compression (incl. rounding)."""
    units = entry.plan.get("units", {})
    roles = list(dict.fromkeys(u.role for u in inp.units if u.layer is not None))
    rows: list[list[Any]] = []
    for u in (u for u in inp.units if u.layer is None):
        rows.append([f"embedding {u.name.split('.')[-1]}", _spec_text(units.get(u.name)), *[""] * (len(roles) + 1)])
    for i in inp.layers:
        ls = entry.plan.get("layers", {}).get(str(i), {})
        cells = [", ".join(_spec_text(units.get(u.name)) for u in inp.units if u.layer == i and u.role == r)
                 for r in roles]
        structure = ", ".join(f"{k}={v}" for k, v in ls.items() if v is not None)
        rows.append([f"layer {i}", "", *cells, structure])
    sharing = entry.plan.get("sharing")
    note = f"<p>sharing: {_esc(sharing)}</p>" if sharing else ""
    return sortable_table(["", "embedding", *roles, "heads/neurons"], rows, sortable=False) + note


def per_layer_sections(inp: ReportInputs) -> str:
    m = inp.metric
    best = inp.summary.best_recipe.trial if inp.summary.best_recipe else None
    out = []
    for e in sorted(inp.entries, key=lambda e: -e.heldout_metrics[m]):
        title = (f"trial {e.trial}{' (best)' if e.trial == best else ''}: {_mb(e.memory_bytes)} MB "
                 f"({e.memory_percent:.2f}% of fp32), held-out {m} {format_quality(e.heldout_metrics[m])}")
        body = (f"<p><a href='{_esc(e.recipe)}'>{_esc(e.recipe)}</a></p>" + per_layer_table(inp, e))
        out.append(details(f"trial-{e.trial}", title, body, opened=e.trial == best))
    return "".join(out)


def _latency_budget(s: SearchSummary) -> str:
    b = s.latency_budget
    if b is None:
        return ""
    of_fp32 = f", {b.spec} of the fp32 model's {b.fp32_ms:.2f} ms" if b.spec.endswith("x") and b.fp32_ms else ""
    return f", latency budget {b.ms:.2f} ms{_esc(of_fp32)} (batch {b.batch} x seq {b.seq}, {_esc(b.source)})"


def write_report(path: Path, inp: ReportInputs, png_name: str = "pareto.png") -> None:
    """report.html in `path` (pareto.png next to it is inlined)."""
    s, m = inp.summary, inp.metric
    png = path.parent / png_name
    img = (f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}' "
           f"alt='quality vs memory and quality vs latency' style='max-width:100%'>") if png.exists() else ""
    steps = "".join(f"<p>{_esc(what)}</p><pre>{_esc(shell_lines(cmd))}</pre>" for what, cmd in next_steps(inp))
    timing = (f"Mean trial {s.mean_trial_s:.1f} s (of which {s.mean_outside_forward_s:.1f} s outside forward "
              f"passes); the search ran {s.elapsed_s:.0f} s." if s.mean_trial_s is not None
              and s.mean_outside_forward_s is not None else f"The search ran {s.elapsed_s:.0f} s.")
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>slimformer report: {_esc(inp.model)}</title><style>{_CSS}</style></head><body>
<h1>slimformer search report</h1>
<p>Model <b>{_esc(inp.model)}</b>; memory budget {s.budget_percent:.2f}% of the fp32 weights
({_mb(inp.budget_bytes)} MB of {_mb(inp.fp32_bytes)} MB){_latency_budget(s)};
quality metric <b>{_esc(m)}</b> (held-out data unless marked "search");
objectives: {_esc(", ".join(inp.objectives))}.</p>
<h2>Verdict</h2>
{verdict(inp)}
<h2>Next steps</h2>
{steps or "<p>No recipe yet.</p>"}
<h2>The front</h2>
{img}
<h2>Pareto plans ({len(inp.entries)}; click a column to sort, a trial for its per-layer choices)</h2>
{front_table(inp)}
<h2>Uniform baselines</h2>
{baseline_table(inp)}
<h2>Latency: where the numbers come from</h2>
{latency_text(inp.latency)}
<h3>Measured on this machine</h3>
{measured_section(inp)}
<h2>Trials</h2>
<p>{_esc(trial_states_text(s))} {_esc(timing)}</p>
<h2>Per-layer choices of every Pareto plan</h2>
<p class="small">{_esc(_NOTATION)}</p>
{per_layer_sections(inp)}
<script>{_SORT_JS}</script>
</body></html>
"""
    atomic_write(path, doc)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1180px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f1f1f1}table.sortable th{cursor:pointer}td{font-variant-numeric:tabular-nums}
pre{overflow-x:auto;background:#f6f6f6;border:1px solid #ddd;padding:.5em .8em;
margin:.2em 0 .8em}
.verdict{font-size:1.1em;font-weight:600}.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em}
.small{font-size:12px;color:#555}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}"""

_SORT_JS = """document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',
function(){var tb=th.closest('table').tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.dir!=='asc';
th.dataset.dir=asc?'asc':'desc';rows.sort(function(a,b){var x=a.cells[i].textContent,y=b.cells[i].textContent,
nx=parseFloat(x),ny=parseFloat(y),c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?c:-c;});
rows.forEach(function(r){tb.appendChild(r);});});});"""


def report_units(units: Sequence[Any]) -> list[UnitSlot]:
    """UnitSlots of an adapter's units (anything with name, role and layer)."""
    return [UnitSlot(u.name, u.role, u.layer) for u in units]
