"""pareto.png and report.html: the front against the baselines and the per-layer choices of the best plans."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import optuna

from slimformer.fileio import atomic_write
from slimformer.search.context import SearchContext
from slimformer.search.records import TrialRecord, is_feasible
from slimformer.search.results import BaselineResult, ParetoEntry, SearchSummary


def write_pareto_png(path: Path, ctx: SearchContext, study: optuna.Study, entries: list[ParetoEntry],
                     baselines: list[BaselineResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = ctx.quality_metric
    qi = ctx.config.objectives.index("quality")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    feas = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    ax.scatter([TrialRecord.from_trial(t).memory_percent for t in feas], [t.values[qi] for t in feas], s=12,
               c="#b0b0b0", label="evaluated trials (search set)")
    ax.scatter([e.memory_percent for e in entries], [e.heldout_metrics[m] for e in entries], s=36,
               c="#d62728", label="Pareto trials (held-out)", zorder=3)
    shown = [e.heldout_metrics[m] for e in entries]
    floor = (min(shown) - 0.05) if shown else None  # keep the front readable; far-off baselines noted
    for b in baselines:
        if b.fits and b.heldout_metrics:
            q = b.heldout_metrics[m]
            if floor is not None and q < floor:
                ax.scatter([], [], marker="s", s=50, label=f"{b.name}: {q:.3f} (below the plotted range)")
                continue
            ax.scatter([b.memory_percent], [q], marker="s", s=50, zorder=4, label=f"{b.name} (held-out)")
            shown.append(q)
    ax.axvline(100 * ctx.budget_bytes / ctx.fp32_bytes, color="k", ls="--", lw=1, label="memory budget")
    if shown:
        lo, hi = min(shown), max(shown)
        pad = max(0.002, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("memory, % of fp32 weights")
    ax.set_ylabel(m)
    ax.set_title(f"{ctx.config.model}: quality vs memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def _spec_text(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "fp32"
    parts = []
    if spec.get("rank"):
        parts.append(f"r{spec['rank']}")
    if spec.get("sparsity"):
        parts.append("2:4" if spec.get("pattern") == "2:4" else f"s{spec['sparsity']:.2f}")
    bits = spec.get("bits", 32)
    parts.append(f"int{bits}" + (f"/g{spec['group_size']}" if spec.get("group_size") else "")
                 if bits in (8, 4) else f"fp{bits}")
    return " ".join(parts)


def per_layer_table(ctx: SearchContext, entry: ParetoEntry) -> str:
    """Rows = layers (and embeddings), columns = roles; each cell the unit's compression."""
    units = entry.plan["units"]
    roles = list(dict.fromkeys(u.role for u in ctx.adapter.units if u.layer is not None))
    rows = []
    emb = [u for u in ctx.adapter.units if u.layer is None]
    for u in emb:
        rows.append(["embeddings", _spec_text(units.get(u.name))] + [""] * (len(roles) + 1))
    for info in ctx.adapter.layers:
        ls = entry.plan["layers"].get(str(info.index), {})
        cells = [_spec_text(units.get(u.name)) for r in roles for u in ctx.adapter.units
                 if u.layer == info.index and u.role == r]
        structure = ", ".join(f"{k}={v}" for k, v in ls.items() if v is not None)
        rows.append([f"layer {info.index}", ""] + cells + [structure])
    sharing = entry.plan.get("sharing")
    note = f"<p>sharing: {html.escape(str(sharing))}</p>" if sharing else ""
    return _table(["", "embedding", *roles, "heads/neurons"], rows) + note


def write_report(path: Path, ctx: SearchContext, entries: list[ParetoEntry], baselines: list[BaselineResult],
                 summary: SearchSummary) -> None:
    m = ctx.quality_metric
    png = path.parent / "pareto.png"
    img = base64.b64encode(png.read_bytes()).decode() if png.exists() else ""
    best, base = summary.best_recipe, summary.best_baseline
    verdict = "no feasible plan was evaluated"
    if best and base:
        diff = best.heldout_quality - base.heldout_quality
        verdict = (f"best recipe trial {best.trial}: held-out {m} {best.heldout_quality:.4f} at "
                   f"{best.memory_percent:.2f}% of fp32, vs best uniform baseline {base.name}: "
                   f"{base.heldout_quality:.4f} at {base.memory_percent:.2f}% ({diff:+.4f})")
    elif best:
        verdict = (f"best recipe trial {best.trial}: held-out {m} {best.heldout_quality:.4f}; "
                   "no uniform baseline fits the budget")
    lat_kind = summary.latency_source
    front_rows = [[e.trial, e.memory_percent, e.memory_bytes, e.latency_ms_estimate,
                   e.search_metrics.get(m), e.heldout_metrics.get(m),
                   *[e.heldout_metrics.get(k) for k in ctx.heldout_eval.metric_names if k != m],
                   e.recipe] for e in sorted(entries, key=lambda e: e.memory_bytes)]
    others = [k for k in ctx.heldout_eval.metric_names if k != m]
    base_rows = [[b.name, b.memory_percent, "yes" if b.fits else f"no ({b.over_budget or 'memory'})", b.latency_ms,
                  (b.search_metrics or {}).get(m), (b.heldout_metrics or {}).get(m),
                  *[(b.heldout_metrics or {}).get(k) for k in others]] for b in baselines]
    top = sorted(entries, key=lambda e: -e.heldout_metrics[m])[:3]
    layers_html = "".join(f"<h3>trial {e.trial} ({e.memory_percent:.2f}%, held-out {m} "
                          f"{e.heldout_metrics[m]:.4f})</h3>{per_layer_table(ctx, e)}" for e in top)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>slimformer report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px}}th{{background:#f3f3f3}}</style></head><body>
<h1>slimformer search report</h1>
<p>model <b>{html.escape(ctx.config.model)}</b>; budget {summary.budget_percent:.2f}% of fp32
({ctx.budget_bytes / 1e6:.2f} MB of {ctx.fp32_bytes / 1e6:.2f} MB); quality metric <b>{m}</b>;
hardware profile {html.escape(ctx.profile.name)}.
Latency values are priced by <b>{html.escape(summary.latency_label)}</b>{
"" if lat_kind == "measured" else ", not measured"}{
" (plans over the budget are never exported: their latency is the roofline estimate)" if lat_kind == "measured"
else ""}.</p>
<p><b>{html.escape(verdict)}</b></p>
<p>trials: {html.escape(str(summary.trial_states))}; {summary.infeasible_trials} over budget (not evaluated);
mean trial {_fmt(summary.mean_trial_s)} s, of which outside forward passes
{_fmt(summary.mean_outside_forward_s)} s.</p>
<img src="data:image/png;base64,{img}" alt="Pareto front">
<h2>Pareto front (feasible trials)</h2>
{_table(["trial", "memory %", "bytes", f"latency ms ({lat_kind})", f"search {m}", f"held-out {m}",
         *[f"held-out {k}" for k in others], "recipe"], front_rows)}
<h2>Uniform baselines</h2>
{_table(["baseline", "memory %", "fits budget", f"latency ms ({lat_kind})", f"search {m}", f"held-out {m}",
         *[f"held-out {k}" for k in others]], base_rows)}
<h2>Per-layer choices of the best plans</h2>
{layers_html}
</body></html>
"""
    atomic_write(path, doc)
