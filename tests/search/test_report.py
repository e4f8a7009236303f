"""The run's explanations: report.html (verdict, every recipe link, next steps, escaping, trial states, rounding and
kernel per unit) and pareto.png (two panels, legend outside the data), and `report --bench N` (opt-in ONNX)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import invoke
from matplotlib.backends.backend_agg import FigureCanvasAgg

from slimformer.api import report
from slimformer.errors import ConfigError
from slimformer.fileio import read_json
from slimformer.models import load
from slimformer.search.report import (
    LatencyNote,
    ReportInputs,
    next_steps,
    per_layer_table,
    report_units,
    shell_lines,
    write_report,
)
from slimformer.search.report_bench import BENCH_FILE, FrontBench, MeasuredPlan, read_front_bench
from slimformer.search.report_html import trial_states_text
from slimformer.search.report_plot import CloudPoint, PlotInputs, pareto_figure, write_pareto_png
from slimformer.search.results import BaselineResult, ParetoFront, SearchSummary

HOSTILE = "<script>alert('x')</script>&\"evil\" model"


def _front(run_dir: Path) -> ParetoFront:
    return ParetoFront.from_json(read_json(run_dir / "pareto.json", {}))


def _inputs(run_dir: Path, model_dir: Path, model: str | None = None) -> ReportInputs:
    """ReportInputs from a finished run's files (no search context), with the real tiny model's units."""
    adapter = load(str(model_dir))
    summary = SearchSummary.from_json(read_json(run_dir / "summary.json", {}))
    note = LatencyNote("calibrated", "calibrated (test)", "prof-x", "v2-x", "CPU A", 1, "onnxruntime 1.0", "CPU B",
                       "hardware profile prof-x was made elsewhere: this run has CPU 'CPU B'", 1, 128, 1, "exact")
    front = _front(run_dir)
    return ReportInputs(str(run_dir), model or summary.model, summary.quality_metric, ["cosine", "neighbours"],
                        front.objectives, front.budget_bytes, front.fp32_bytes, front.trials,
                        [BaselineResult(**b) for b in read_json(run_dir / "baselines.json", [])], summary,
                        report_units(adapter.units), [i.index for i in adapter.layers], note)


def test_report_links_every_front_recipe_and_gives_next_steps(shared_run) -> None:
    _, run_dir, _ = shared_run
    doc = (run_dir / "report.html").read_text()
    front = _front(run_dir).trials
    assert front
    for e in front:
        assert f"<a href='{e.recipe}'>" in doc, e.recipe
        assert (run_dir / e.recipe).is_file()
        assert f"id='trial-{e.trial}'" in doc, "every Pareto plan has its per-layer section"
    best = json.loads((run_dir / "summary.json").read_text())["best_recipe"]
    assert f"slimformer apply {run_dir}/recipes/trial-{best['trial']}.yaml --model " in doc
    assert "--onnx" in doc and "slimformer bench " in doc and f"slimformer report {run_dir} --bench 3" in doc
    assert "{&#x27;COMPLETE&#x27;" not in doc and "{'COMPLETE'" not in doc, "trial states are said in words"
    assert "evaluated within the memory budget" in doc
    assert " rtn" in doc, "the per-layer cells name the rounding method"
    assert "Verdict" in doc and "best uniform baseline" in doc
    assert "roofline estimate, neither measured nor calibrated" in doc  # the tiny run's profile has no kernel model


def test_report_escapes_a_hostile_model_name(shared_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    inp = _inputs(run_dir, tiny_model_dir, model=HOSTILE)
    evil = replace(inp.baselines[0], name="<img src=x onerror=alert(1)>")
    inp = replace(inp, baselines=[evil, *inp.baselines[1:]], run_dir="runs/a b;rm -rf ~")
    out = tmp_path / "report.html"
    write_report(out, inp)
    doc = out.read_text()
    assert "<script>alert" not in doc and "<img src=x" not in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    assert "&lt;img src=x onerror=alert(1)&gt;" in doc
    assert doc.count("<script>") == 1, "only the table-sorting script"
    cmds = dict(next_steps(inp))
    apply_cmd = next(c for c in cmds.values() if c.startswith("slimformer apply"))
    assert "--model '<script>alert('\"'\"'x'\"'\"')</script>&\"evil\" model'" in apply_cmd, "shell-quoted"
    assert "'runs/a b;rm -rf ~/recipes/trial-" in apply_cmd
    assert "CPU B" in doc and "made elsewhere" in doc, "a profile from another CPU is said so"


def test_long_commands_break_into_lines_bash_reads_as_one_command() -> None:
    import shlex
    import subprocess

    cmd = shlex.join(["slimformer", "apply", "runs/a b;rm -rf ~/r.yaml", "--model", "<x --out y>", "--out",
                      "model-trial-1-rec", "--recover", "--minutes", "15", "--onnx"])
    wrapped = shell_lines(cmd, width=50)
    assert wrapped.count(" \\\n    --") >= 2
    args = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + wrapped.removeprefix("slimformer ")],
                          capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert args == shlex.split(cmd)[1:]
    assert shell_lines("slimformer report run --bench 3") == "slimformer report run --bench 3"


def test_per_layer_cells_show_rounding_and_kernel_when_present(shared_run, tiny_model_dir: Path) -> None:
    _, run_dir, _ = shared_run
    inp = _inputs(run_dir, tiny_model_dir)
    entry = inp.entries[0]
    plain = per_layer_table(inp, entry)
    assert "kernel" not in plain
    units = {k: {**v, "bits": 4, "group_size": 16, "method": "gptq", "kernel": "matmulnbits"}
             for k, v in entry.plan["units"].items()}
    table = per_layer_table(inp, replace(entry, plan={**entry.plan, "units": units}))
    assert "int4 g16 gptq kernel matmulnbits" in table


def test_trial_states_in_words(shared_run) -> None:
    s = shared_run[2].summary
    text = trial_states_text(replace(s, trial_states={"COMPLETE": 10, "PRUNED": 2, "FAIL": 1}, infeasible_trials=3))
    assert text.startswith("13 trials: 7 evaluated within the memory budget; 3 sampled over the budget")
    assert "2 stopped early by multi-fidelity pruning" in text and "1 failed" in text
    dup = trial_states_text(replace(s, trial_states={"COMPLETE": 5, "PRUNED": 3}, infeasible_trials=0,
                                    duplicate_trials=2))
    assert "1 stopped early" in dup and "2 repeated an evaluated plan" in dup


def _plot_inputs(run_dir: Path) -> PlotInputs:
    front = _front(run_dir)
    baselines = [BaselineResult(**b) for b in read_json(run_dir / "baselines.json", [])]
    cloud = [CloudPoint(e.memory_percent + 1, e.latency_ms_estimate, e.search_metrics["cosine"] - 0.01)
             for e in front.trials]
    return PlotInputs("tiny", "cosine", 100 * front.budget_bytes / front.fp32_bytes, "roofline estimate", cloud,
                      front.trials, baselines)


def test_plot_has_two_panels_and_the_legend_outside_them(shared_run, tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    inp = _plot_inputs(run_dir)
    fig = pareto_figure(inp)
    assert len(fig.axes) == 2
    mem, lat = fig.axes
    assert "% of the fp32" in mem.get_xlabel() and "ms" in lat.get_xlabel() and "cosine" in mem.get_ylabel()
    assert any(list(ln.get_xdata()) == [inp.budget_percent] * 2 for ln in mem.get_lines()), "budget line"
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert "Pareto trials (held-out data)" in labels and "evaluated trials (search set)" in labels
    assert any(lbl.startswith("baseline ") for lbl in labels)
    with_latency_budget = pareto_figure(replace(inp, latency_budget_ms=0.5))
    assert any(list(ln.get_xdata()) == [0.5, 0.5] for ln in with_latency_budget.axes[1].get_lines())
    FigureCanvasAgg(fig).draw()
    box = legend.get_window_extent()
    assert all(box.y1 < ax.get_window_extent().y0 for ax in fig.axes), "the legend sits below both panels"
    out = tmp_path / "pareto.png"
    write_pareto_png(out, inp)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _measured(inp: PlotInputs, factor: float) -> FrontBench:
    e = inp.front[0]
    ms = e.latency_ms_estimate * factor
    plan = MeasuredPlan(e.trial, e.recipe, e.latency_ms_estimate, e.latency_ms_estimate / 2, ms, ms, ms, 3, ms, 1.0,
                        1000, {"cosine": 1.0})
    return FrontBench(1, 128, 1, "exact", "CPU", "1.0", "today", [plan], [9.0, 8.0, 7.0], 2)


def test_plot_draws_measured_latency_near_the_prediction_and_names_it_when_far(shared_run) -> None:
    inp = _plot_inputs(shared_run[1])
    near = pareto_figure(replace(inp, measured=_measured(inp, 1.1)))
    assert any("measured (report --bench)" in t.get_text() for t in near.legends[0].get_texts())
    far = pareto_figure(replace(inp, measured=_measured(inp, 6.0)))
    assert not any("measured" in t.get_text() for t in far.legends[0].get_texts())
    assert any("far from the predicted range: trial" in t.get_text() for t in far.texts), "named in the caption"
    lat = far.axes[1]
    assert lat.get_xlim()[1] < 2 * max(e.latency_ms_estimate for e in inp.front), "the axis is not stretched"


def test_bench_json_round_trips_and_flags_a_busy_machine(tmp_path: Path) -> None:
    from slimformer.search.report_bench import write_front_bench

    e = MeasuredPlan(3, "recipes/trial-3.yaml", 10.0, 5.0, 20.0, 19.0, 21.0, 30, 40.0, 0.5, 1234, {"cosine": 0.99})
    fb = FrontBench(1, 128, 2, "exact", "CPU", "1.32", "2026-01-01", [e], [3.0, 2.0, 1.0], 2)
    write_front_bench(tmp_path, fb)
    back = read_front_bench(tmp_path)
    assert back == fb and back.busy and back.of_trial(3) == e and back.of_trial(4) is None
    assert e.over_predicted == 2.0 and e.over_roofline == 4.0
    (tmp_path / BENCH_FILE).write_text("{not json")
    assert read_front_bench(tmp_path) is None, "an unreadable bench.json leaves the report without it"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_report_without_bench_writes_no_onnx(shared_run, tmp_path: Path) -> None:
    copy = _copy(shared_run[1], tmp_path)
    res = invoke("report", copy)
    assert res.exit_code == 0
    assert not list(copy.rglob("*.onnx")) and not (copy / BENCH_FILE).exists()
    assert "No plan of this front has been measured" in (copy / "report.html").read_text()


def test_report_bench_measures_the_best_plan_beside_its_prediction(shared_run, tmp_path: Path) -> None:
    copy = _copy(shared_run[1], tmp_path)
    res = invoke("report", copy, "--bench", "1", "--runs", "3")
    assert res.exit_code == 0
    fb = read_front_bench(copy)
    assert fb is not None and len(fb.plans) == 1 and fb.batch == 1 and fb.seq == 128
    p = fb.plans[0]
    best = json.loads((copy / "summary.json").read_text())["best_recipe"]["trial"]
    assert p.trial == best and p.measured_ms > 0 and p.roofline_ms > 0 and p.runs == 3
    assert p.over_roofline == pytest.approx(p.measured_ms / p.roofline_ms)
    assert f"trial {best}: measured" in res.output
    doc = (copy / "report.html").read_text()
    assert "measured / roofline" in doc and f"{p.measured_ms:.2f}" in doc
    assert not list(copy.rglob("*.onnx")), "the exports live in a temporary folder"


def test_report_bench_rejects_a_negative_count(shared_run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--bench -1"):
        report(_copy(shared_run[1], tmp_path), bench=-1)
    assert invoke("report", tmp_path / "run", "--bench", "-1").exit_code == 2
