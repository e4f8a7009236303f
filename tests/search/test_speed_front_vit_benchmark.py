"""benchmarks/speed_front_vit.py: its search config (the speed axes under both budgets) and its docs table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the benchmark module
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports train_vit from next to itself (inside main only)
    spec = importlib.util.spec_from_file_location("speed_front_vit", ROOT / "benchmarks" / "speed_front_vit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_config_has_the_speed_axes_and_both_budgets(bench, tmp_path) -> None:  # noqa: ANN001
    cfg = bench.search_config(tmp_path / "teacher", tmp_path / "run", 10, 1)
    assert cfg.budget.memory == "12.5%" and cfg.budget.latency == "0.6x" and cfg.deploy == "onnx"
    assert cfg.latency.source == "calibrated" and cfg.latency.seq == 17 and cfg.recover is not None
    attn, ffn = cfg.space.groups
    assert attn.heads_kept[0] == 4 and ffn.neurons_kept[0] == 1.0  # "keep all" first
    assert set(attn.kernel) == set(ffn.kernel) == {"exact", "int8"}


def test_docs_table_marks_the_winner(bench, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("# B\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    acc = {"accuracy/test-10000": 0.81, "agreement/test-10000": 0.95}
    models = [{"name": "fp32", "file_percent_of_fp32": 100.0, "metrics": {"accuracy/test-10000": 0.8168},
               "accuracy_points_below_teacher": 0.0, "predicted_ms": 0.3},
              {"name": "trial-7", "file_percent_of_fp32": 12.1, "metrics": acc, "accuracy_points_below_teacher": 0.68,
               "predicted_ms": 0.17, "measured_ms": {"median": 0.18}, "ratio_to_fp32": {"median": 0.58}}]
    r = {"test_set": "test-10000", "bench": None, "created": "now", "command": "c", "teacher_accuracy": 0.8168,
         "budget_bytes": 227525, "fp32_predicted_ms": 0.3, "models": models, "winner": "trial-7"}
    bench.update_docs(r)
    text = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "<!-- speed_front_vit:begin -->" in text and "| trial-7 **(winner)** | 12.10 | 0.8100 | -0.68 |" in text
    assert "| 0.180 | 0.580 | — |" in text and "not timed (--no-bench)" in text
