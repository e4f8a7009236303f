"""Decoder LMs (models/causal_lm.py) on tiny random GPT-2 (fused Conv1D qkv, tied), Llama (grouped-query
attention, SwiGLU, untied head) and Qwen2 (grouped-query attention, tied) models saved to disk and found by
`load`: roles from structure, identity exactness, every transform keeps shapes, memory == packed tensors, tied
tables stored once, recipe round trip, ONNX (exact kernels) == torch, next-token metrics, chunking, and the
errors users see (hub unreachable, a metric of another kind of model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import invoke, tiny_config, tiny_model_dir, write_config

from slimformer.compression.apply import apply_plan
from slimformer.compression.memory import plan_memory, set_deploy
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, pack_model, packed_bytes, save_compressed
from slimformer.data import load_texts
from slimformer.errors import ModelLoadError, PlanError
from slimformer.models import CausalLMAdapter, load
from slimformer.models.causal_lm import TiedLMHead

VOCAB, HIDDEN, HEADS, KV, INTER, LAYERS = 30522, 32, 4, 2, 64, 2


def _config(kind: str) -> Any:
    import transformers as tr

    if kind == "gpt2":
        return tr.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                             bos_token_id=101, eos_token_id=102)
    cls = tr.LlamaConfig if kind == "llama" else tr.Qwen2Config
    return cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
               tie_word_embeddings=kind == "qwen2", bos_token_id=101, eos_token_id=102)


def make_causal_lm(kind: str, out: Path, tokenizer: Any) -> Path:
    """A tiny random causal LM of `kind` (gpt2, llama, qwen2) saved with the MiniLM tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


KINDS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module", params=KINDS)
def lm(request, tmp_path_factory, minilm_tokenizer) -> tuple[str, Path, CausalLMAdapter]:
    d = make_causal_lm(request.param, tmp_path_factory.mktemp(request.param), minilm_tokenizer)
    a = load(str(d), max_length=24)
    assert isinstance(a, CausalLMAdapter)
    return request.param, d, a


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_texts("fortunes", limit=6)


def _logits(a: CausalLMAdapter, model: torch.nn.Module, texts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [a.logits(model, b) for b in a.make_batches(texts, 3)]


def _every_unit(a: CausalLMAdapter, spec: UnitSpec) -> dict[str, UnitSpec]:
    return {u.name: spec for u in a.units}


# -- structure -----------------------------------------------------------------------------------------------
def test_roles_from_structure(lm) -> None:
    kind, _, a = lm
    roles = [u.role for u in a.units if u.layer == 0]
    if kind == "gpt2":
        assert roles == ["qkv", "attn_out", "ffn_in", "ffn_out"]
        assert not any(type(m).__name__ == "Conv1D" for m in a.model.modules())  # Conv1D became nn.Linear
    else:
        assert roles == ["query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out"]
        assert a.unit(a.layers[0].qkv_units[1]).shape == (KV * HIDDEN // HEADS, HIDDEN)
        assert a.layers[0].kv_group == HEADS // KV and a.layers[0].ffn_gate_unit.endswith("gate_proj")
    assert [u.role for u in a.units if u.layer is None] == (["embedding", "lm_head"] if kind == "llama"
                                                            else ["embedding"])
    assert a.tied == (kind != "llama") and a.kind == "causal_lm" and a.family == "causal_lm"
    head = a.model.get_output_embeddings()
    assert isinstance(head, TiedLMHead) == a.tied


def test_identity_plan_reproduces_logits_exactly(lm, texts) -> None:
    _, _, a = lm
    ref = _logits(a, a.model, texts)
    got = _logits(a, apply_plan(a, CompressionPlan()), texts)
    assert all(torch.equal(x, y) for x, y in zip(ref, got, strict=True))


def test_conv1d_conversion_keeps_gpt2_logits(tmp_path, minilm_tokenizer, texts) -> None:
    from transformers import AutoModelForCausalLM

    d = make_causal_lm("gpt2", tmp_path / "g", minilm_tokenizer)
    orig = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    a = load(str(d), max_length=24)
    b = a.make_batches(texts, 3)[0]
    with torch.no_grad():
        want = orig(**b.inputs).logits
    torch.testing.assert_close(a.logits(a.model, b), want, atol=1e-5, rtol=1e-5)


PLANS = {
    "int8": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(bits=8))),
    "int4-g16": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(bits=4, group_size=16))),
    "fp16": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(bits=16))),
    "rank": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(rank=8))),
    "sparse": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(sparsity=0.5))),
    "2:4": lambda a: CompressionPlan(units=_every_unit(a, UnitSpec(sparsity=0.5, pattern="2:4"))),
    "heads": lambda a: CompressionPlan(layers={0: LayerSpec(heads_kept=2)}),
    "neurons": lambda a: CompressionPlan(layers={1: LayerSpec(neurons_kept=16)}),
    "sharing": lambda a: CompressionPlan(sharing=SharingSpec(groups=((0, 1),), scope="block")),
    "mixed": lambda a: CompressionPlan(
        units={**_every_unit(a, UnitSpec(bits=4, group_size=16)), a.units[0].name: UnitSpec(bits=8, rank=8)},
        layers={0: LayerSpec(heads_kept=2, neurons_kept=32)}),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_every_transform_keeps_shapes_and_memory_equals_packed(lm, texts, name) -> None:
    _, _, a = lm
    plan = PLANS[name](a)
    model = apply_plan(a, plan)
    ref, got = _logits(a, a.model, texts), _logits(a, model, texts)
    assert [x.shape for x in got] == [x.shape for x in ref] and all(torch.isfinite(x).all() for x in got)
    assert plan_memory(a, plan, "safetensors").total_bytes == packed_bytes(pack_model(model))


def test_tied_table_is_stored_once_and_the_head_uses_its_compressed_weights(lm, texts) -> None:
    kind, _, a = lm
    fp32 = packed_bytes(pack_model(a.model))
    assert fp32 == plan_memory(a, CompressionPlan(), "safetensors").total_bytes == 4 * a.total_parameters()
    emb = a.units[0]
    plan = CompressionPlan(units={emb.name: UnitSpec(bits=4, group_size=16)})
    model = apply_plan(a, plan)
    packed = pack_model(model)
    assert any("lm_head" in k for k in packed) == (kind == "llama")
    assert sum(k.startswith(emb.name + ".") for k in packed) == 2  # codes and scales, once
    if a.tied:  # the head multiplies by the quantised table: changing only the table changes the logits
        b = a.make_batches(texts, 3)[0]
        h = model.get_output_embeddings()
        table = model.get_submodule(emb.name).weight
        hidden = torch.randn(2, HIDDEN)
        torch.testing.assert_close(h(hidden), hidden @ table.T)
        assert not torch.equal(a.logits(model, b), a.logits(a.model, b))


def test_gqa_head_pruning_drops_whole_kv_groups(lm) -> None:
    kind, _, a = lm
    if kind == "gpt2":
        pytest.skip("no grouped-query attention")
    info = a.layers[0]
    model = apply_plan(a, CompressionPlan(layers={0: LayerSpec(heads_kept=2)}))
    hd = info.head_dim
    q, k, v = (model.get_submodule(n).weight.shape[0] for n in info.qkv_units)
    assert (q, k, v) == (2 * hd, hd, hd)
    with pytest.raises(PlanError, match="not a multiple of 2, the query heads per key/value group"):
        apply_plan(a, CompressionPlan(layers={0: LayerSpec(heads_kept=3)}))


def test_recipe_round_trip(lm, texts, tmp_path) -> None:
    _, _, a = lm
    plan = PLANS["mixed"](a)
    model = apply_plan(a, plan)
    recipe = Recipe.from_plan(plan, a)
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml").to_plan(a) == recipe.to_plan(a)
    again = load_compressed(save_compressed(a, model, recipe, tmp_path / "out"))
    assert isinstance(again, CausalLMAdapter) and again.tied == a.tied
    for x, y in zip(_logits(a, model, texts), _logits(again, again.model, texts), strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_onnx_export_matches_torch_with_low_bit_kernels(lm, texts, tmp_path) -> None:
    from slimformer.export.onnx_export import export_onnx, graph_overhead_bytes, session

    _, _, a = lm
    units = _every_unit(a, UnitSpec(bits=4, group_size=16))
    units[a.units[1].name] = UnitSpec(bits=8)
    plan = CompressionPlan(units=units, layers={0: LayerSpec(heads_kept=2, neurons_kept=32)})
    model = apply_plan(a, plan)
    info = export_onnx(a, model, tmp_path / "model.onnx")
    assert info.n_matmulnbits >= 6 and info.n_gather_quantized == 1 and info.n_int8 == 1
    assert not info.unconverted
    sess = session(info.path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for b in a.make_batches(texts, 3):
        with torch.no_grad():
            want = a.logits(model, b).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in b.inputs.items()})[0]
        mask = b.inputs["attention_mask"].bool().numpy()
        assert got.shape == want.shape and np.abs(got - want)[mask].max() < 1e-4
    set_deploy(a, "onnx", graph_overhead_bytes(a))
    try:  # the onnx deploy target is an upper bound of the file, tied head kernel included
        assert info.file_bytes <= plan_memory(a, plan).total_bytes
    finally:
        set_deploy(a, "safetensors")


# -- data and metrics -------------------------------------------------------------------------------------------
def test_texts_are_chunked_to_max_length_and_targets_are_next_tokens(lm) -> None:
    _, _, a = lm
    long = " ".join(["word"] * 100)
    rows = a.chunks([long, "x"])
    n, short = len(a.tokenizer(long)["input_ids"]), len(a.tokenizer("x")["input_ids"])
    assert [len(r) for r in rows] == [24] * (n // 24) + ([n % 24] if n % 24 >= 2 else []) + [short]
    b = a.make_batches([long, "a short one."], 8)[0]
    assert b.inputs["input_ids"].shape[1] == 24
    out = a.output(a.model, b)
    assert out.shape == (b.labels.shape[0], VOCAB) and b.labels.shape[0] == int(b.inputs["attention_mask"][:, 1:].sum())


def test_metrics_on_teacher_and_student(lm, texts) -> None:
    _, _, a = lm
    assert a.default_quality_metric == "neg_kl" and a.metric_names(True) == ("perplexity", "agreement", "neg_kl")
    batches = a.make_batches(texts, 3)
    labels = torch.cat([b.labels for b in batches])
    with torch.no_grad():
        t = torch.cat([a.output(a.model, b) for b in batches])
        s = torch.cat([a.output(apply_plan(a, PLANS["int4-g16"](a)), b) for b in batches])
    same = a.fidelity_metrics(t, t, labels)
    assert same["perplexity"] == pytest.approx(1.0) and same["agreement"] == 1.0 and same["kl"] == pytest.approx(0)
    m = a.fidelity_metrics(t, s, labels)
    assert m["kl"] > 0 and m["ppl_ratio"] == pytest.approx(m["student_perplexity"] / m["teacher_perplexity"])
    assert m["perplexity"] == pytest.approx(1 / m["ppl_ratio"])


def test_kl_sized_quality_values_print_with_significant_digits() -> None:
    """neg_kl (the causal-LM default) of near-lossless plans is ~1e-5: 4 decimals would print -0.0000."""
    from slimformer.models.metrics import format_quality

    assert format_quality(-3.826e-06) == "-3.826e-06" and format_quality(0.98123) == "0.9812"
    assert format_quality(0.0) == "0.0000" and format_quality(-0.05) == "-0.0500"


# -- user errors -------------------------------------------------------------------------------------------------
def test_hub_unreachable_is_one_line_naming_a_local_directory(monkeypatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for model_id in ("gpt2", "Qwen/Qwen2.5-0.5B"):
        with pytest.raises(ModelLoadError, match=rf"model '{model_id}' is not a local directory and the Hugging Face "
                                                 r"hub is unreachable .*hf download .* --local-dir DIR.*pass DIR"):
            load(model_id)
        res = invoke("inspect", model_id)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_a_metric_of_another_kind_of_model_exits_2_naming_the_valid_ones(lm, tmp_path, tmp_path_factory) -> None:
    kind, d, _ = lm
    if kind != "qwen2":
        pytest.skip("one causal LM is enough")
    for model, metric, valid in ((d, "cosine", "'perplexity', 'agreement', 'neg_kl'"),
                                 (tiny_model_dir(tmp_path_factory), "perplexity", "'cosine', 'neighbours'")):
        cfg = write_config(tmp_path / f"{metric}.yaml", tiny_config(model, tmp_path / f"run-{metric}",
                                                                    quality_metric=metric))
        res = invoke("search", cfg)
        assert res.exit_code == 2, res.output
        assert res.stderr.strip().splitlines() == [
            f"error: quality_metric '{metric}' does not apply to this "
            f"{'causal_lm' if metric == 'cosine' else 'encoder'} model; choose one of [{valid}]"]
        assert not (tmp_path / f"run-{metric}").exists()


def test_bench_times_prefill_against_fp32_and_ort_int8(lm, tmp_path) -> None:
    kind, d, _ = lm
    if kind != "llama":
        pytest.skip("one causal LM is enough")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {id: tiny}\nrules:\n  - match: 're:.*'\n    spec: {bits: 4, group_size: 16}\n")
    res = invoke("bench", recipe, "--model", d, "--samples", 8, "--seq", 16, "--batch", 1, "--runs", 2,
                 "--warmup", 1, "--threads", 1, "--no-progress", "--json", tmp_path / "bench.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "bench.json").read_text())
    names = [m["name"] for m in out["models"]]
    assert names == ["fp32", "int8-dynamic-tensor", "int8-dynamic-channel", "target"]
    target = out["models"][-1]
    assert target["file_bytes"] < out["models"][0]["file_bytes"] / 3 and target["latency"][0]["seq"] == 16
    assert 0.5 < target["fidelity"]["agreement"] <= 1.0
