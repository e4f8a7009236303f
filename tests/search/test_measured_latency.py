"""latency.source: measured - candidates exported to ONNX and timed; over-budget plans never exported."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from helpers import study_trials, tiny_config, write_config

pytest.importorskip("onnxruntime")

from slimformer.api import search  # noqa: E402
from slimformer.compression.plan import CompressionPlan, UnitSpec  # noqa: E402
from slimformer.evaluators.latency.measured import LatencyMeter  # noqa: E402
from slimformer.models import load  # noqa: E402
from slimformer.search.runner import default_storage  # noqa: E402

OVER = {"g0.emb.bits": 8, "g0.emb.group_size": 16, "g1.L0.bits": 8, "g1.L0.rank_fraction": 1.0,
        "g1.L1.bits": 8, "g1.L1.rank_fraction": 1.0}


def test_measured_search_times_feasible_plans_and_labels_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", budget={"memory": "25%"}, trials=2, baselines=False,
                      start_points="none", latency={"source": "measured", "batch": 1, "seq": 16, "runs": 5})
    cfg_path = write_config(tmp_path / "search.yaml", cfg)
    url = default_storage(tmp_path / "run")
    (tmp_path / "run").mkdir()
    study = optuna.create_study(storage=url, study_name="slimformer", directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial(OVER)  # 8-bit embeddings: over the budget
    study.enqueue_trial({**OVER, "g0.emb.bits": 4})
    study.enqueue_trial({**OVER, "g0.emb.bits": 4, "g1.L0.bits": 4, "g1.L1.bits": 4})

    result = search(cfg_path, progress=False)
    trials = study_trials(url)
    over = [t for t in trials if t.user_attrs.get("feasible") is False]
    timed = [t for t in trials if "metrics" in t.user_attrs]
    assert over and len(timed) == 2
    for t in over:
        assert t.user_attrs["latency_source"] == "estimate (over budget: not exported)"
    for t in timed:
        assert t.user_attrs["latency_source"] == "measured" and t.user_attrs["latency_runs"] == 5
        assert t.user_attrs["latency_ms"] > 0 and t.user_attrs["latency_iqr_ms"] >= 0
        assert t.values[1] == t.user_attrs["latency_ms"]  # the objective is the measured median
    assert result.summary.latency_source == "measured"
    assert result.summary.latency_label.startswith("measured") and "seq 16" in result.summary.latency_label
    pareto = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert pareto["trials"] and all(e["latency_source"] == "measured" for e in pareto["trials"])
    assert "latency ms (measured)" in (tmp_path / "run" / "report.html").read_text()


def test_meter_caches_by_plan_and_feeds_the_configured_shape(tiny_model_dir: Path) -> None:
    adapter = load(str(tiny_model_dir), max_length=32)
    batch = adapter.make_batches(["a short text", "another, longer text to pad the batch"], 2)[0]
    feed = adapter.fixed_shape_feed(batch, 3, 40)
    assert {k: v.shape for k, v in feed.items()} == {k: (3, 40) for k in batch.inputs}
    assert feed["attention_mask"][:, 20:].sum() == 0  # zero-padded past the real tokens

    meter = LatencyMeter(adapter, batch, batch=2, seq=24, threads=1, runs=3, warmup=1)
    compressed = []

    def compress(plan: CompressionPlan):
        from slimformer.compression.apply import apply_plan

        compressed.append(plan)
        return apply_plan(adapter, plan)

    plan = CompressionPlan(units={"encoder.layer.0.attention.self.query": UnitSpec(bits=4, group_size=16)})
    first = meter.measure(plan, compress=compress)
    again = meter.measure(CompressionPlan(units=dict(plan.units)), compress=compress)
    assert again is first and len(compressed) == 1  # exported and timed once
    assert first.runs == 3 and first.batch == 2 and first.seq == 24 and first.ms > 0
    assert meter.cached(CompressionPlan()) is None
