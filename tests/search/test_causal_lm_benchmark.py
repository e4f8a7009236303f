"""The decoder benchmark's bookkeeping (benchmarks/causal_lm.py): its search config, the strictest in-budget
baseline, the acceptance sentence and the docs section, on a run directory written by hand (no search run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_benchmark):  # noqa: ANN001, ANN201 - the benchmark module
    return load_benchmark("causal_lm")


def _m(ppl_ratio: float, kl: float, agree: float = 0.99) -> dict[str, float]:
    return {"ppl_ratio": ppl_ratio, "perplexity": 1 / ppl_ratio, "kl": kl, "neg_kl": -kl, "agreement": agree}


def test_search_config_is_valid_and_searches_neg_kl_over_fp16_int8_int4(bench, tmp_path) -> None:  # noqa: ANN001
    cfg = bench.search_config(tmp_path / "teacher", tmp_path / "run", "30%", 12, 1, 30, False)
    assert cfg.quality_metric == "neg_kl" and cfg.deploy == "safetensors" and cfg.budget.memory == "30%"
    emb, attn, ffn = cfg.space.groups
    assert emb.bits == [8, 4] and attn.bits == ffn.bits == [16, 8, 4]
    assert None in attn.group_size and attn.method == ["rtn", "gptq"]
    assert cfg.recover is not None and cfg.recover.steps == 30
    assert cfg.data.heldout_samples == 256 and cfg.data.search_samples == 64


def test_verdict_names_met_or_not(bench) -> None:  # noqa: ANN001
    assert bench.verdict(1.0010, 1.0020, "uniform-int8").startswith("**met**")
    no = bench.verdict(1.0020, 1.0010, "uniform-int8")
    assert no.startswith("**not met**") and "uniform-int8" in no and "1.00200 vs 1.00100" in no
    assert bench.verdict(None, 1.0, "x").startswith("no comparison")


def test_ranking_agreement_is_spearman_of_search_against_heldout(bench) -> None:  # noqa: ANN001
    rows = [{"search_metrics": _m(1 + i / 100, i / 10, 0.9 + i / 100),
             "heldout_metrics": _m(1 - i / 100, i / 10 + 0.01, 0.9 + i / 100)} for i in range(5)]
    agree = bench.ranking_agreement(rows + [{"search_metrics": None, "heldout_metrics": None}])
    assert agree["plans"] == 5 and agree["neg_kl"] == pytest.approx(1.0) and agree["perplexity"] == pytest.approx(-1.0)


def _run_dir(d: Path, best_trial: int, baselines: list[dict[str, Any]], recovered: bool = False) -> Path:
    d.mkdir(parents=True)
    best = {"trial": best_trial, "recipe": f"recipes/trial-{best_trial}.yaml", "memory_percent": 29.5,
            "heldout_neg_kl": -1e-5, "heldout_metrics": _m(1.0001, 1e-5)}
    summary = {"budget_percent": 30.0, "trial_states": {"COMPLETE": 3}, "infeasible_trials": 0, "elapsed_s": 1.0,
               "fp32_bytes": 1000, "quality_metric": "neg_kl", "best_recipe": best, "best_baseline": None,
               "recovery": {"trials": [], "best_trial": best_trial, "best_after_neg_kl": -9e-6,
                            "settings": {"steps": 30}} if recovered else None}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "baselines.json").write_text(json.dumps(baselines))
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"heldout_samples": 256}}))
    front = [{"trial": t, "memory_percent": 29.0, "recipe": f"recipes/trial-{t}.yaml",
              "search_metrics": _m(1.0, kl), "heldout_metrics": _m(1.0001, kl * 1.1)}
             for t, kl in ((best_trial, 1e-5), (7, 2e-5), (8, 3e-5))]
    (d / "pareto.json").write_text(json.dumps({"trials": front}))
    (d / "python_docs.json").write_text(json.dumps(_m(1.0002, 2e-5)))  # cached: no re-scoring in the test
    if recovered:
        (d / "recovered.json").write_text(json.dumps({str(best_trial): {"key": "k", "record": {
            "before": _m(1.0001, 1e-5), "after": _m(1.00005, 9e-6)}}}))
    return d


def test_collect_compares_with_the_lowest_heldout_ppl_ratio_and_renders_the_section(bench, tmp_path) -> None:  # noqa: ANN001
    base = [{"name": "uniform-int8", "memory_percent": 25.8, "fits": True, "heldout_metrics": _m(1.0003, 3e-5)},
            {"name": "uniform-rank-0.2", "memory_percent": 29.9, "fits": True, "heldout_metrics": _m(1.05, 1e-2)},
            {"name": "uniform-int8-g32", "memory_percent": 31.0, "fits": False}]
    a = bench.collect(_run_dir(tmp_path / "a", 3, base), tmp_path, smoke=True)
    extra = [{"name": "uniform-int8-g128", "memory_percent": 25.9, "fits": True, "extra": True,
              "heldout_metrics": _m(1.0002, 2.5e-5)}]
    (tmp_path / "b").mkdir()
    b_dir = _run_dir(tmp_path / "b" / "run", 5, base[:1], recovered=True)
    (b_dir / "extra_baselines.json").write_text(json.dumps(extra))
    b = bench.collect(b_dir, tmp_path, smoke=True)
    assert a["best_baseline_by_ppl"]["name"] == "uniform-int8"  # not the one over budget, not the worse rank
    assert b["best_baseline_by_ppl"]["name"] == "uniform-int8-g128"  # the benchmark's extra baselines count
    assert a["best_by_search"]["trial"] == 3 and b["recovery_metrics"]["5"]["after"]["ppl_ratio"] == 1.00005
    teacher = {"model_args": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "intermediate_size": 768},
               "parameters": 7.5e6, "vocab_size": 17204, "steps": 220, "batch": 16, "seq": 64,
               "tokens_seen": 225280, "train_rows": 6016, "train_texts": 12364, "minutes": 30.0,
               "heldout_perplexity": {"fortunes": 300.0, "python-docs": 400.0}}
    text = bench.doc_section({"teacher": teacher, "search_30": a, "search_15": b, "created": "now",
                              "machine": {"cpu": "cpu"}, "command": "python benchmarks/causal_lm.py"})
    assert text.startswith(bench.BEGIN) and text.rstrip().endswith(bench.END)
    assert "**met**" in text and "1.00010 vs 1.00030" in text  # 1.0001 < 1.0003: the search wins here
    assert "| ≤30% baseline: uniform-int8 | 25.80% | 1.00030 |" in text and "uniform-int8-g32" in text
    assert "≤15% after recovery (trial 5) | - | 1.00005 |" in text
