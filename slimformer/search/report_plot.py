"""pareto.png: quality vs memory and quality vs latency, the held-out front against the search-set cloud and
the uniform baselines (two panels, one shared legend and caption below them, outside the data)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slimformer.search.report_bench import FrontBench
from slimformer.search.results import BaselineResult, ParetoEntry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FRONT_COLOUR = "#d62728"
CLOUD_COLOUR = "#c4c4c4"
# baselines: never the front's red, each its own hollow marker so a Pareto point under it stays visible
BASELINE_STYLES = (("#1f77b4", "s"), ("#2ca02c", "D"), ("#9467bd", "^"), ("#ff7f0e", "v"), ("#17becf", "P"),
                   ("#8c564b", "X"), ("#e377c2", "p"), ("#7f7f7f", "h"), ("#bcbd22", "<"), ("#000080", ">"))
CAPTION = ("Grey dots and hollow red circles: quality on the search set (the data the search optimised); filled "
           "red: the same Pareto trials on held-out data it never saw (usually lower; a thin line joins each "
           "trial's two scores). Baselines: uniform plans (one setting for every layer), held-out data.")


@dataclass(frozen=True)
class CloudPoint:
    """One evaluated, in-budget trial: where it sits, scored on the search set."""

    memory_percent: float
    latency_ms: float
    quality: float


@dataclass(frozen=True)
class PlotInputs:
    """Everything pareto.png shows (built by rundir from the study; tests build it directly)."""

    title: str
    metric: str  # the quality metric (y axis)
    budget_percent: float  # the memory budget, % of fp32
    latency_axis: str  # what priced latency, e.g. "predicted: calibrated kernel model, batch 1 x seq 128"
    cloud: list[CloudPoint]
    front: list[ParetoEntry]
    baselines: list[BaselineResult]
    measured: FrontBench | None = None
    latency_budget_ms: float | None = None  # drawn when the search has a latency budget
    notes: list[str] = field(default_factory=list)


def _y_range(p: PlotInputs) -> tuple[float, float] | None:
    """Front (held-out and search set) and baselines near it; baselines far below are listed instead."""
    m = p.metric
    ys = [e.heldout_metrics[m] for e in p.front] + [e.search_metrics[m] for e in p.front if m in e.search_metrics]
    if not ys:
        ys = [c.quality for c in p.cloud]
    if not ys:
        return None
    floor = min(ys) - 0.05
    ys += [q for b in p.baselines if (q := _baseline_q(b, m)) is not None and q >= floor]
    lo, hi = min(ys), max(ys)
    pad = max(0.002, 0.08 * (hi - lo))
    return lo - pad, hi + pad


def _baseline_q(b: BaselineResult, metric: str) -> float | None:
    if not b.fits or not b.heldout_metrics or metric not in b.heldout_metrics:
        return None
    return b.heldout_metrics[metric]


def _measured_off_axis(p: PlotInputs) -> list[str]:
    """The measured latencies as text when drawing them would squash the predicted ones (another machine, or a
    busy one: more than 1.5x the largest predicted value, or under half the smallest); else empty."""
    if p.measured is None:
        return []
    front = {e.trial for e in p.front}
    plans = [mp for mp in p.measured.plans if mp.trial in front]
    xs = [e.latency_ms_estimate for e in p.front] + [c.latency_ms for c in p.cloud]
    if not plans or not xs:
        return []
    if all(0.5 * min(xs) <= mp.measured_ms <= 1.5 * max(xs) for mp in plans):
        return []
    return [f"trial {mp.trial} {mp.measured_ms:.1f} ms (predicted {mp.predicted_ms:.1f})" for mp in plans]


def pareto_figure(p: PlotInputs) -> Figure:
    """The two-panel figure (left: memory, right: latency; shared quality axis)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    m = p.metric
    fig = Figure(figsize=(12, 6.4), dpi=100)
    ax_mem, ax_lat = fig.subplots(1, 2, sharey=True)
    yr = _y_range(p)
    below: list[str] = []
    for ax, x_of in ((ax_mem, lambda e: e.memory_percent), (ax_lat, lambda e: e.latency_ms_estimate)):
        ax.scatter([c.memory_percent if ax is ax_mem else c.latency_ms for c in p.cloud],
                   [c.quality for c in p.cloud], s=10, c=CLOUD_COLOUR, zorder=1)
        for e in p.front:
            if m in e.search_metrics:
                ax.plot([x_of(e)] * 2, [e.search_metrics[m], e.heldout_metrics[m]], color=FRONT_COLOUR, lw=0.7,
                        alpha=0.45, zorder=2)
        ax.scatter([x_of(e) for e in p.front if m in e.search_metrics],
                   [e.search_metrics[m] for e in p.front if m in e.search_metrics], s=26, facecolors="none",
                   edgecolors=FRONT_COLOUR, linewidths=0.9, zorder=3)
        ax.scatter([x_of(e) for e in p.front], [e.heldout_metrics[m] for e in p.front], s=34, c=FRONT_COLOUR,
                   edgecolors="black", linewidths=0.4, zorder=4)
        for i, b in enumerate(p.baselines):
            q = _baseline_q(b, m)
            x = b.memory_percent if ax is ax_mem else b.latency_ms
            if q is None or x is None:
                continue
            if yr is not None and q < yr[0]:
                if ax is ax_mem:
                    below.append(f"{b.name}: {m} {q:.3f}")
                continue
            colour, marker = BASELINE_STYLES[i % len(BASELINE_STYLES)]
            ax.scatter([x], [q], marker=marker, s=110, facecolors="none", edgecolors=colour, linewidths=2.0,
                       zorder=5)
        ax.grid(alpha=0.3)
        if yr is not None:
            ax.set_ylim(*yr)
    ax_mem.axvline(p.budget_percent, color="black", ls="--", lw=1)
    if p.latency_budget_ms is not None:
        ax_lat.axvline(p.latency_budget_ms, color="black", ls="--", lw=1)
    off_axis = _measured_off_axis(p)
    if p.measured is not None and not off_axis:
        front = {e.trial: e for e in p.front}
        for mp in p.measured.plans:
            if mp.trial in front:
                q = front[mp.trial].heldout_metrics[m]
                ax_lat.plot([mp.predicted_ms, mp.measured_ms], [q, q], color="black", lw=0.8, ls=":", zorder=5)
                ax_lat.scatter([mp.measured_ms], [q], marker="x", s=60, c="black", zorder=6)

    ax_mem.set_xlabel("memory, % of the fp32 weight bytes\n ")
    ax_mem.set_ylabel(f"{m} (higher is better)")
    ax_mem.set_title("quality vs memory")
    ax_lat.set_xlabel(f"latency, ms per forward pass\n({p.latency_axis})")
    ax_lat.set_title("quality vs latency")
    fig.suptitle(p.title, fontsize=12)

    handles = [
        Line2D([], [], ls="", marker="o", ms=4, color=CLOUD_COLOUR, label="evaluated trials (search set)"),
        Line2D([], [], ls="", marker="o", ms=6, mfc="none", mec=FRONT_COLOUR, label="Pareto trials (search set)"),
        Line2D([], [], ls="", marker="o", ms=6, mfc=FRONT_COLOUR, mec="black", mew=0.4,
               label="Pareto trials (held-out data)"),
    ]
    for i, b in enumerate(p.baselines):
        q = _baseline_q(b, m)
        if q is None or (yr is not None and q < yr[0]):
            continue
        colour, marker = BASELINE_STYLES[i % len(BASELINE_STYLES)]
        handles.append(Line2D([], [], ls="", marker=marker, ms=8, mfc="none", mec=colour, mew=2.0,
                              label=f"baseline {b.name} (held-out)"))
    handles.append(Line2D([], [], color="black", ls="--", lw=1, label=f"memory budget ({p.budget_percent:.2f}%)"))
    if p.latency_budget_ms is not None:
        handles[-1].set_label(f"budgets ({p.budget_percent:.2f}% of fp32; {p.latency_budget_ms:.2f} ms)")
    if p.measured is not None and not off_axis:
        handles.append(Line2D([], [], ls=":", marker="x", color="black", ms=7,
                              label="measured (report --bench), joined to the prediction"))
    notes = [CAPTION, *p.notes]
    if below:
        notes.append("Below the plotted range: " + "; ".join(below) + ".")
    if off_axis:
        notes.append("Measured with report --bench (see report.html), far from the predicted range: "
                     + "; ".join(off_axis) + ".")
    caption = "\n".join(_wrap(n, 190) for n in notes)
    height = fig.get_figheight()
    caption_in = 0.08 + 0.15 * (caption.count("\n") + 1)  # inches, at fontsize 8
    legend_in = 0.1 + 0.19 * math.ceil(len(handles) / 3)
    fig.text(0.012, 0.08 / height, caption, fontsize=8, color="#333333", va="bottom", ha="left")
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, caption_in / height), ncol=3, fontsize=8,
               frameon=False)
    fig.subplots_adjust(left=0.065, right=0.985, top=0.9, wspace=0.06,
                        bottom=(caption_in + legend_in + 0.7) / height)
    return fig


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur] if cur else lines)


def write_pareto_png(path: Path, inputs: PlotInputs) -> None:
    """Render the figure to `path` (written under a temporary name and renamed)."""
    fig = pareto_figure(inputs)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
