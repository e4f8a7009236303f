"""HTML pieces of report.html: escaped tables (sortable by a click on a header), collapsible sections, and the
trial states said in words."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from slimformer.search.results import SearchSummary


class Raw(str):
    """Markup built here from escaped parts: inserted as is (every other cell is escaped)."""


def _cell(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else html.escape(str(v))


def sortable_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], sortable: bool = True) -> str:
    """A table of escaped cells (`Raw` cells as they are); `sortable` adds the click-to-sort class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    cls = " class='sortable'" if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def details(anchor: str, title: str, body: str, opened: bool = False) -> str:
    """A collapsible section; `title` is escaped, `body` is markup."""
    return (f"<details id='{html.escape(anchor)}'{' open' if opened else ''}><summary>{html.escape(title)}</summary>"
            f"{body}</details>")


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def trial_states_text(s: SearchSummary) -> str:
    """e.g. '60 trials: 52 evaluated within the memory budget; 6 sampled over the budget (skipped, ...); ...'."""
    st = s.trial_states
    total = sum(st.values())
    evaluated = max(0, st.get("COMPLETE", 0) - s.infeasible_trials)
    budgets = "the memory and latency budgets" if s.latency_budget is not None else "the memory budget"
    parts = [f"{evaluated} evaluated within {budgets}"]
    if s.infeasible_trials:
        parts.append(f"{s.infeasible_trials} sampled over {'a' if s.latency_budget is not None else 'the'} budget "
                     "(skipped without evaluation; they do not count toward the trial count)")
    pruned = st.get("PRUNED", 0) - s.duplicate_trials
    if pruned > 0:
        parts.append(f"{pruned} stopped early by multi-fidelity pruning (clearly dominated after a slice of the data)")
    if s.duplicate_trials:
        parts.append(f"{s.duplicate_trials} repeated an evaluated plan (answered from that trial, not evaluated "
                     "again; stored as PRUNED)")
    if st.get("FAIL"):
        parts.append(f"{st['FAIL']} failed (the reason is the trial's fail_reason in the study; trials interrupted "
                     "by a stopped driver are redone)")
    if st.get("RUNNING"):
        parts.append(f"{st['RUNNING']} still running (or left by a driver that stopped)")
    if st.get("WAITING"):
        parts.append(f"{st['WAITING']} queued")
    known = {"COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"}
    parts += [f"{v} {k.lower()}" for k, v in st.items() if k not in known and v]
    return f"{_n(total, 'trial', 'trials')}: " + "; ".join(parts) + "."
