"""The model-family contract, checked for every registered family (Optuna's storage-suite pattern): each
case is a tiny random model saved to disk in its family's layout, found by `load` through the registry,
and held to the same checks - units with roles, identity copy, batches and outputs, export inputs,
latency shapes, default data, metrics and persistence. A family registered without a case here fails
`test_every_registered_family_has_a_case`, so a new family cannot skip the suite."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimformer.errors import ModelLoadError
from slimformer.models import (
    HFEncoderAdapter,
    ModelAdapter,
    create_vit,
    families,
    get_family,
    load,
    load_hf_dir,
    register_family,
    save_timm_dir,
    unregister_family,
)
from slimformer.models.base import ROLES
from slimformer.models.metrics import CAUSAL_LM_METRICS, CLASSIFIER_METRICS, ENCODER_METRICS

HIDDEN, HEADS, INTER, LAYERS, CLASSES = 32, 4, 64, 2, 3
VIT_ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=4)


def _bert_config(**extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=INTER, vocab_size=30522, max_position_embeddings=72, **extra)


def _save_hf(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_bert(out: Path, tokenizer: Any) -> Path:
    from transformers import BertModel

    torch.manual_seed(0)
    return _save_hf(BertModel(_bert_config(), add_pooling_layer=False), tokenizer, out)


def make_sentence_transformers(out: Path, tokenizer: Any) -> Path:
    """A tiny BERT with sentence-transformers metadata: CLS pooling, max_seq_length 48."""
    make_bert(out, tokenizer)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return out


def make_classifier(out: Path, tokenizer: Any) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return _save_hf(BertForSequenceClassification(_bert_config(num_labels=CLASSES)), tokenizer, out)


def make_vit(out: Path, tokenizer: Any) -> Path:
    torch.manual_seed(0)
    save_timm_dir(create_vit("vit_tiny_patch16_224", dict(VIT_ARGS)), out)
    return out


def make_causal_lm(out: Path, tokenizer: Any) -> Path:
    """A tiny Llama-style decoder (grouped-query attention, SwiGLU; tests/models/test_causal_lm.py has more)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64)
    return _save_hf(LlamaForCausalLM(cfg), tokenizer, out)


@dataclass(frozen=True)
class Case:
    """One tiny model of a family: how to write it to disk and what `load` must make of it."""

    name: str
    family: str
    build: Callable[[Path, Any], Path]
    kind: str
    out_dim: int
    pooling: str | None = None
    per_token: bool = False  # outputs are one row per next-token position, labels the next tokens


CASES = (
    Case("hf-encoder", "hf", make_bert, "encoder", HIDDEN, "mean"),
    Case("sentence-transformers", "hf", make_sentence_transformers, "encoder", HIDDEN, "cls"),
    Case("hf-classifier", "hf", make_classifier, "classifier", CLASSES),
    Case("timm-vit", "timm", make_vit, "classifier", 10),
    Case("causal-lm", "causal_lm", make_causal_lm, "causal_lm", 30522, per_token=True),
)


def test_every_registered_family_has_a_case() -> None:
    assert set(families()) <= {c.family for c in CASES}, "add a Case for the new family to this suite"


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request, tmp_path_factory, minilm_tokenizer) -> tuple[Case, Path, ModelAdapter]:
    c: Case = request.param
    d = c.build(tmp_path_factory.mktemp(c.name), minilm_tokenizer)
    return c, d, load(str(d))


def _samples(adapter: ModelAdapter, n: int) -> list[Any] | np.ndarray:
    return adapter.heldout_samples(adapter.default_data_source, n).inputs  # type: ignore[return-value]


def test_load_finds_the_family(case) -> None:
    c, d, a = case
    assert isinstance(a, get_family(c.family)) and a.family == c.family and a.kind == c.kind
    cfg = json.loads((d / "config.json").read_text())
    assert type(a).detect(d, cfg)
    if c.pooling is not None:
        assert a.pooling == c.pooling  # type: ignore[attr-defined]


def test_units_found_with_roles(case) -> None:
    _, _, a = case
    assert len(a.layers) == LAYERS and len(set(a.unit_names)) == len(a.units)
    assert all(u.role in ROLES for u in a.units)
    for info in a.layers:
        for name in (*info.qkv_units, info.attn_out_unit, info.ffn_in_unit, info.ffn_out_unit):
            u = a.unit(name)
            assert u.layer == info.index and tuple(a.model.get_submodule(name).weight.shape) == u.shape
        assert info.num_heads == HEADS and info.num_heads * info.head_dim == HIDDEN


@torch.no_grad()
def test_batches_outputs_and_identity_copy(case) -> None:
    c, _, a = case
    x = _samples(a, 6)
    batches = a.make_batches(x, 4)
    assert [len(next(iter(b.inputs.values()))) for b in batches] == [4, 2]
    ref = torch.cat([a.output(a.model, b) for b in batches])
    rows = sum(len(b.labels) for b in batches) if c.per_token else 6  # type: ignore[arg-type]
    assert ref.shape == (rows, c.out_dim)
    copy = a.fresh_model()
    assert copy is not a.model
    assert torch.equal(torch.cat([a.output(copy, b) for b in batches]), ref)


def test_export_inputs_and_latency_shapes(case) -> None:
    _, _, a = case
    trace = a.trace_batch()
    axes = a.dynamic_axes(trace)
    assert set(axes) == {*trace.inputs, *a.export_output_names()} and all(v[0] == "batch" for v in axes.values())
    feed = a.fixed_length_feed(_samples(a, 4), 3, 16)
    assert set(feed) <= set(trace.inputs) and all(v.shape[0] == 3 for v in feed.values())
    shaped = a.fixed_shape_feed(trace, 5, 12)
    assert set(shaped) == set(trace.inputs) and all(v.shape[0] == 5 for v in shaped.values())
    if a.has_sequence_axis:
        assert all(v.shape[1] == 16 for v in feed.values()) and all(v.shape[1] == 12 for v in shaped.values())
        assert a.latency_seqs([64, 128]) == [64, 128]
    else:
        assert a.latency_seqs([64, 128]) == [0]
    shapes = a.default_latency_shapes()
    assert shapes and all(b >= 1 and s >= 1 for b, s in shapes)
    assert a.default_latency_seq >= 1 and a.doc_label


def test_default_data_source_is_usable(case) -> None:
    _, _, a = case
    src = a.default_data_source
    drawn = a.eval_samples(src, 8, 6, 4, seed=0)
    assert (len(drawn.search.inputs), len(drawn.heldout.inputs), len(drawn.calibration.inputs)) == (8, 6, 4)
    assert a.make_batches(drawn.search.inputs, 4, drawn.search.labels)
    assert len(a.heldout_samples(src, 5).inputs) == 5 and len(a.calibration_samples(src, 4)) == 4
    source = a.recovery_source("auto")
    exclude = a.recovery_exclusions(src, 5)
    train = a.recovery_samples(source, exclude, limit=8, seed=0)
    assert len(train) == 8 and not {str(t) for t in exclude} & {str(t) for t in train if isinstance(t, str)}


def test_calibration_search_and_heldout_are_disjoint(case) -> None:
    """Every family draws three disjoint sets (by content), so calibration samples never score a trial, and
    `calibration_samples` / `heldout_samples` (apply, bench) give a seed-0 search's calibration / held-out sets."""
    from slimformer.search.rundir import sample_fingerprint

    _, _, a = case
    src = a.default_data_source
    drawn = a.eval_samples(src, 8, 6, 4, seed=0)
    prints = [{sample_fingerprint(x) for x in s.inputs} for s in (drawn.calibration, drawn.search, drawn.heldout)]
    assert [len(p) for p in prints] == [4, 8, 6]
    assert not (prints[0] & prints[1] or prints[0] & prints[2] or prints[1] & prints[2])
    assert {sample_fingerprint(x) for x in a.calibration_samples(src, 4)} == prints[0]
    assert {sample_fingerprint(x) for x in a.heldout_samples(src, 6).inputs} == prints[2]


@torch.no_grad()
def test_metrics_are_known_and_perfect_on_the_teacher(case) -> None:
    c, _, a = case
    known = set(ENCODER_METRICS) | set(CLASSIFIER_METRICS) | set(CAUSAL_LM_METRICS)
    assert set(a.metric_names(True)) <= known and set(a.metric_names(False)) <= known
    batches = a.make_batches(_samples(a, 12), 6)
    out = torch.cat([a.output(a.model, b) for b in batches]).float()
    labels = out.argmax(-1) if c.kind == "classifier" else None
    if c.per_token:  # next-token ids come with the batches: the perplexity metric needs them
        labels = torch.cat([b.labels for b in batches])  # type: ignore[misc]
    assert a.default_quality_metric in a.metric_names(labels is not None)
    metrics = a.fidelity_metrics(out, out, labels)
    assert set(a.metric_names(labels is not None)) <= set(metrics)
    perfect = 0.0 if a.default_quality_metric == "neg_kl" else 1.0  # -KL of the teacher against itself is 0
    assert metrics[a.default_quality_metric] == pytest.approx(perfect, abs=1e-6)


def test_skeleton_round_trip(case, tmp_path) -> None:
    c, _, a = case
    a.save_base(tmp_path)
    meta = json.loads((tmp_path / "slimformer_model.json").read_text())
    assert meta["family"] == c.family
    again = get_family(meta["family"]).skeleton(tmp_path)
    assert type(again) is type(a) and again.unit_names == a.unit_names and again.kind == a.kind


# -- registering a family ------------------------------------------------------------------------
def test_a_new_family_takes_one_registration(tmp_path, minilm_tokenizer) -> None:
    @register_family("toy")
    class ToyAdapter(HFEncoderAdapter):
        """A BERT whose config.json carries `slimformer_toy`, or built from a `toy:` id."""

        catch_all = False

        @classmethod
        def detect(cls, local_dir: Path, config: Any) -> bool:
            return bool(config.get("slimformer_toy"))

        @classmethod
        def handles_id(cls, model_id: str) -> bool:
            return model_id.startswith("toy:")

        @classmethod
        def from_dir(cls, local_dir: Path, model_id: str, max_length: int | None = None) -> ToyAdapter:
            a = load_hf_dir(local_dir, model_id, max_length)
            return cls(a.model, a.model_id, a.tokenizer, a.pooling, a.max_length, local_dir)

        @classmethod
        def from_id(cls, model_id: str, max_length: int | None = None) -> ToyAdapter:
            return cls.from_dir(tmp_path / "toy", model_id, max_length)

    try:
        d = make_bert(tmp_path / "toy", minilm_tokenizer)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "slimformer_toy": True}))
        assert get_family("toy") is ToyAdapter and ToyAdapter.family == "toy"
        assert HFEncoderAdapter.family == "hf"  # the parent family keeps its name
        by_dir, by_id = load(str(d)), load("toy:tiny")
        assert type(by_dir) is ToyAdapter and type(by_id) is ToyAdapter and by_id.model_id == "toy:tiny"
        assert type(load(str(make_bert(tmp_path / "plain", minilm_tokenizer)))) is HFEncoderAdapter
    finally:
        unregister_family("toy")
    assert "toy" not in families()
    with pytest.raises(ModelLoadError, match="unknown model family 'toy'; known families: causal_lm, hf, timm"):
        get_family("toy")
