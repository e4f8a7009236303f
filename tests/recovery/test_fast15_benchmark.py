"""benchmarks/fast15.py: its candidate recipes (int8 kernels on every linear, within 15% of the fp32 ONNX bytes) and
its docs table; the committed examples/recipes/minilm-fast15.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimformer.compression.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 13_539_225  # 15% of the fp32 ONNX bytes of all-MiniLM-L6-v2 (90,261,504)


@pytest.fixture(scope="module")
def bench(load_benchmark):  # noqa: ANN001, ANN201 - the benchmark module
    return load_benchmark("fast15")


def test_every_candidate_is_a_valid_recipe_with_int8_kernels_on_every_linear(bench, tmp_path) -> None:  # noqa: ANN001
    for name in bench.CANDIDATES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bench.recipe_dict(name, BUDGET), sort_keys=False))
        rec = Recipe.load(path)  # no YAML aliases, no unknown keys
        linear_rules = [r for r in rec.rules if r.match != "embeddings.word_embeddings"]
        assert [r.spec.kernel for r in linear_rules] == ["int8"] * 3
        assert rec.provenance.budget is not None and rec.provenance.budget.bytes == BUDGET
        tiered = bench.CANDIDATES[name][3] > 0  # else one per-row int4 table that recovery can train
        assert (rec.embedding_tiers is not None) == tiered == (len(rec.rules) == 3)
        neurons = bench.CANDIDATES[name][4]
        assert (rec.structure is not None and rec.structure.refit) == (neurons is not None)
        assert all(layer.neurons_kept == neurons for layer in rec.layers)


def test_table_reports_both_domains_and_the_verdict(bench) -> None:  # noqa: ANN001
    row = {"candidate": "a5", "percent_bound": 14.98, "onnx_percent": 14.81,
           "before": {"fortunes": 0.968, "python-docs": 0.966},
           "recovery": {"steps": 160, "seconds_per_step": 9.0}, "load_average_end": 11.0,
           "after": {"fortunes": 0.981, "python-docs": 0.979}, "after_onnx": {"fortunes": 0.9808, "python-docs": 0.979},
           "onnx_torch_gap": 0.0002, "met": False}
    text = bench.table([row])
    assert ("| a5 | attn int8, FFN int4 g32 | 1536 | 5000 | 14.81 | 0.9680 / 0.9660 | 160 | 9.00 (11.0) | "
            "0.9810 / 0.9790 |") in text
    assert text.rstrip().endswith("| no |")


@pytest.mark.slow
def test_candidates_fit_15_percent_of_the_fp32_onnx_bytes(bench, tmp_path) -> None:  # noqa: ANN001
    from slimformer.api import load_model
    from slimformer.compression.memory import plan_memory, set_deploy
    from slimformer.export import graph_overhead_bytes

    adapter = load_model(bench.MODEL)
    set_deploy(adapter, "onnx", graph_overhead_bytes(adapter))
    for name in bench.CANDIDATES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bench.recipe_dict(name, BUDGET), sort_keys=False))
        assert plan_memory(adapter, Recipe.load(path).to_plan(adapter)).total_bytes <= BUDGET, name


@pytest.mark.slow
def test_the_committed_minilm_fast15_recipe(bench) -> None:  # noqa: ANN001
    """int8 kernels on every linear, within 15% of the fp32 ONNX bytes, and a recovery record that `apply --recover`
    and `bench --recover` replay (the two-domain mixture)."""
    from slimformer.api import load_model
    from slimformer.compression.memory import plan_memory, set_deploy
    from slimformer.export import graph_overhead_bytes

    rec = Recipe.load(ROOT / "examples" / "recipes" / "minilm-fast15.yaml")
    adapter = load_model(bench.MODEL)
    set_deploy(adapter, "onnx", graph_overhead_bytes(adapter))
    plan = rec.to_plan(adapter)
    linears = [u.name for u in adapter.units if u.kind == "linear"]
    assert len(linears) == 36 and all(plan.units[n].kernel == "int8" for n in linears)
    assert plan_memory(adapter, plan).total_bytes <= BUDGET
    assert rec.recovery is not None and rec.recovery.settings["data"] == bench.RECOVER_DATA
    assert rec.recovery.after["cosine"] > rec.recovery.before["cosine"]
