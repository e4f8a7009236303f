"""The onnx deploy target: `plan_memory` bounds the `onnx/model.onnx` file from above (tightly), so a budget
holds for the file a user deploys; a search's front, exported with `apply --onnx`, is within its budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import invoke, shared_run

pytest.importorskip("onnxruntime")

from slimformer.compression.apply import apply_plan  # noqa: E402
from slimformer.compression.memory import _nbits_block, plan_memory, set_deploy  # noqa: E402
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec  # noqa: E402
from slimformer.compression.saving import ONNX_FILE  # noqa: E402
from slimformer.export import export_onnx, graph_overhead_bytes  # noqa: E402
from slimformer.export import kernels as K  # noqa: E402
from slimformer.models import HFEncoderAdapter  # noqa: E402


def test_block_rule_matches_the_exporter() -> None:
    for k in (8, 16, 24, 32, 37, 64, 96, 128, 384, 1536, 3072):
        for group in (None, 8, 16, 24, 32, 48, 64, 96, 128, 512, 4096):
            for bits in (4, 8):
                assert _nbits_block(k, group, bits) == K.nbits_block(k, group, bits), (k, group, bits)


@pytest.fixture(scope="module")
def bert64(minilm_tokenizer) -> HFEncoderAdapter:
    import transformers as tr

    cfg = tr.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=30522, max_position_embeddings=72)
    torch.manual_seed(0)
    a = HFEncoderAdapter(tr.BertModel(cfg).eval(), "tiny-bert64", minilm_tokenizer, "mean", 32)
    set_deploy(a, "onnx", graph_overhead_bytes(a))
    return a


def _plans(a: HFEncoderAdapter) -> dict[str, CompressionPlan]:
    def every(**kw) -> CompressionPlan:
        return CompressionPlan({u.name: UnitSpec(**kw) for u in a.units})

    linears = [u.name for u in a.units if u.role != "embedding"]
    return {
        "int8 per row": every(bits=8), "int4 g32": every(bits=4, group_size=32), "int4 per row": every(bits=4),
        "int4 g48 (re-blocked)": every(bits=4, group_size=48), "int8 g48 (dequant)": every(bits=8, group_size=48),
        "fp16": every(bits=16), "rank 8 int4": every(rank=8, bits=4, group_size=32),
        "heads+neurons": CompressionPlan({u.name: UnitSpec(bits=4, group_size=32) for u in a.units},
                                         {0: LayerSpec(heads_kept=2, neurons_kept=64)}),
        "shared int8": CompressionPlan({u.name: UnitSpec(bits=8) for u in a.units}, {}, SharingSpec(((0, 1),))),
        "sparse 2:4 int4": CompressionPlan({n: UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=32)
                                            for n in linears}),
        "kernel int8": CompressionPlan({n: UnitSpec(bits=4, group_size=32, kernel="int8") for n in linears}),
        "kernel int8 smoothed": CompressionPlan({n: UnitSpec(bits=4, group_size=32, kernel="int8", smooth=0.8)
                                                 for n in linears}),
        "kernel int8 rank 8 smoothed": CompressionPlan({n: UnitSpec(rank=8, bits=8, kernel="int8", smooth=0.5)
                                                        for n in linears}),
    }


def test_onnx_accounting_never_under_estimates_the_file(bert64, tmp_path: Path) -> None:
    for name, plan in _plans(bert64).items():
        info = export_onnx(bert64, apply_plan(bert64, plan, rtn_fallback=True), tmp_path / "m.onnx")
        mem = plan_memory(bert64, plan)
        assert mem.deploy == "onnx"
        margin = mem.total_bytes - info.file_bytes
        assert 0 <= margin <= 0.05 * info.file_bytes, (name, info.file_bytes, mem.total_bytes)
        if "rank" not in name and "kernel" not in name:  # graphs of low rank / int8-kernel units: looser bound
            assert margin <= 0.01 * info.file_bytes, (name, info.file_bytes, mem.total_bytes)  # MiniLM: <= 0.1%


def test_sparse_plans_are_priced_dense_for_onnx(bert64) -> None:
    sparse = CompressionPlan({u.name: UnitSpec(sparsity=0.5) for u in bert64.units if u.role != "embedding"})
    assert plan_memory(bert64, sparse, "onnx").total_bytes == plan_memory(bert64, CompressionPlan(), "onnx").total_bytes
    assert plan_memory(bert64, sparse, "safetensors").total_bytes < plan_memory(bert64, CompressionPlan(),
                                                                                "safetensors").total_bytes


def test_safetensors_is_the_default_and_fp32_reference_is_unchanged(bert64, make_tiny) -> None:
    plan = CompressionPlan({u.name: UnitSpec(bits=4, group_size=32) for u in bert64.units})
    st, ox = plan_memory(bert64, plan, "safetensors"), plan_memory(bert64, plan)
    assert ox.fp32_bytes == st.fp32_bytes and ox.total_bytes > st.total_bytes
    assert plan_memory(make_tiny("bert"), CompressionPlan()).deploy == "safetensors"


def test_search_front_exports_within_budget(tmp_path_factory, tmp_path: Path) -> None:
    """Every Pareto recipe of a small search (deploy onnx, the default) exported by apply --onnx is a file
    within the search's budget; the recipe carries that budget in its provenance."""
    cfg_path, run_dir, _ = shared_run(tmp_path_factory)
    cfg = yaml.safe_load(cfg_path.read_text())
    recipes = sorted((run_dir / "recipes").glob("trial-*.yaml"))
    assert recipes
    for i, r in enumerate(recipes):
        budget = yaml.safe_load(r.read_text())["provenance"]["budget"]
        assert budget["deploy"] == "onnx" and budget["bytes"] > 0
        out = tmp_path / f"out{i}"
        res = invoke("apply", r, "--model", cfg["model"], "--out", out, "--onnx", "--samples", 8)
        assert res.exit_code == 0, res.output
        assert (out / ONNX_FILE).stat().st_size <= budget["bytes"]


@pytest.mark.slow
def test_minilm_uniform_int4_g64_at_15_percent(minilm_dir, tmp_path: Path) -> None:
    """The reported case: MiniLM int4 g64 everywhere is 14.93% of fp32 as packed weights but its ONNX file
    is ~13.65 MB, over a 15% budget (13,539,225 bytes). The onnx accounting bounds the file (so a search
    with deploy onnx rejects the plan), and apply --onnx refuses to leave an over-budget file."""
    from slimformer.api import apply_recipe, load_model
    from slimformer.errors import BudgetError

    a = load_model(str(minilm_dir))
    fp32 = plan_memory(a, CompressionPlan()).total_bytes
    budget = int(0.15 * fp32)
    plan = CompressionPlan({u.name: UnitSpec(bits=4, group_size=64) for u in a.units})
    assert plan_memory(a, plan, "safetensors").total_bytes <= budget
    set_deploy(a, "onnx", graph_overhead_bytes(a))
    accounted = plan_memory(a, plan).total_bytes
    assert accounted > budget
    rec = {"slimformer_recipe": 1, "model": {"id": str(minilm_dir)},
           "rules": [{"match": "re:.*", "spec": {"bits": 4, "group_size": 64}}],
           "provenance": {"budget": {"bytes": budget, "deploy": "onnx"}}}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(rec))
    with pytest.raises(BudgetError, match="over the recipe's budget of 13,539,225 bytes"):
        apply_recipe(r, str(minilm_dir), out_dir=tmp_path / "out", samples=16, onnx=True)
    assert not (tmp_path / "out" / ONNX_FILE).exists()
    rec["provenance"] = {}  # without a budget claim it is written: the accounting bounds it tightly
    r.write_text(yaml.safe_dump(rec))
    res = apply_recipe(r, str(minilm_dir), out_dir=tmp_path / "out2", samples=16, onnx=True)
    assert res.onnx is not None and res.onnx.max_abs_diff < 1e-4
    assert res.onnx.file_bytes <= accounted <= res.onnx.file_bytes * 1.002
