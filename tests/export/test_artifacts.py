"""Artifacts that plug into users' tools: `apply --out DIR --onnx` writes `DIR/onnx/model.onnx` returning what
`SentenceTransformer.encode` returns (`sentence_embedding`) plus `last_hidden_state`, with metadata; plain
transformers / sentence-transformers loaders fail loudly on DIR instead of random-initialising it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from helpers import invoke

ort = pytest.importorskip("onnxruntime")

from slimformer.api import load_model  # noqa: E402
from slimformer.compression.saving import LEGACY_MODEL_FILE, MODEL_FILE, ONNX_FILE, RECIPE_FILE  # noqa: E402
from slimformer.data import load_texts  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "A somewhat longer sentence, with commas, "
         "and several more words than the others have.", "Short one."]


def write_st_dir(d: Path, tokenizer, normalize: bool = True, pooling: str = "mean") -> Path:
    """A tiny sentence-transformers directory: random BERT + MiniLM tokenizer + Pooling (+ Normalize)."""
    import transformers as tr

    cfg = tr.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=30522, max_position_embeddings=128)
    torch.manual_seed(1)
    tr.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    tokenizer.save_pretrained(d)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (d / "2_Normalize").mkdir()
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return d


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    return write_st_dir(tmp_path_factory.mktemp("tiny-st"), minilm_tokenizer)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, st_dir) -> Path:
    rules = [{"match": "embeddings.word_embeddings", "spec": {"bits": 4, "group_size": 32}},
             {"match": "re:.*attention.*", "spec": {"bits": 8}},
             {"match": "re:.*(intermediate|output).*", "spec": {"bits": 4, "group_size": 16}}]
    p = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    p.write_text(yaml.safe_dump({"slimformer_recipe": 1, "model": {"id": str(st_dir)}, "rules": rules}))
    return p


@pytest.fixture(scope="module")
def applied(tmp_path_factory, st_dir, recipe) -> Path:
    out = tmp_path_factory.mktemp("applied") / "out"
    res = invoke("apply", recipe, "--model", st_dir, "--out", out, "--onnx", "--samples", 16)
    assert res.exit_code == 0, res.output
    return out


def test_adapter_encode_equals_sentence_transformers(st_dir) -> None:
    from sentence_transformers import SentenceTransformer

    adapter = load_model(str(st_dir))
    assert adapter.normalize and adapter.pooling == "mean"  # type: ignore[attr-defined]
    ours = adapter.encode(adapter.model, TEXTS).numpy()  # type: ignore[attr-defined]
    theirs = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # quality is measured before the normalisation: cosine-based metrics do not change
    pooled = torch.cat([adapter.output(adapter.model, b) for b in adapter.make_batches(TEXTS, 4)])
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=1), torch.from_numpy(ours), atol=1e-6)


def test_layout_outputs_and_metadata(applied: Path) -> None:
    assert (applied / ONNX_FILE).is_file() and not (applied / "model.onnx").exists()
    assert (applied / MODEL_FILE).is_file() and not (applied / LEGACY_MODEL_FILE).exists()
    assert (applied / "2_Normalize").is_dir()  # every sentence-transformers module folder is copied
    proto = onnx.load(str(applied / ONNX_FILE))
    assert [o.name for o in proto.graph.output] == ["sentence_embedding", "last_hidden_state"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["pooling"] == "mean" and meta["normalize"] == "true" and meta["max_length"] == "64"
    assert meta["recipe_sha256"] == hashlib.sha256((applied / RECIPE_FILE).read_bytes()).hexdigest()
    assert meta["slimformer_version"] and meta["producer"] == "slimformer"


def test_onnx_equals_encode_of_the_compressed_model(applied: Path) -> None:
    """ONNX `sentence_embedding` == encode() of the compressed torch model (1e-4); `last_hidden_state` too."""
    adapter = load_model(str(applied))
    texts = TEXTS + load_texts("fortunes")[:12]
    ref = adapter.encode(adapter.model, texts).numpy()  # type: ignore[attr-defined]
    sess = ort.InferenceSession(str(applied / ONNX_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for b, lo in zip(adapter.make_batches(texts, 8), range(0, len(texts), 8), strict=True):
        feed = {k: b.inputs[k].numpy() for k in names}
        emb, hidden = sess.run(["sentence_embedding", "last_hidden_state"], feed)
        assert np.abs(emb - ref[lo:lo + 8]).max() < 1e-4
        with torch.no_grad():
            t_hidden = adapter.model(**b.inputs).last_hidden_state.numpy()
        assert hidden.shape == t_hidden.shape and np.abs(hidden - t_hidden).max() < 1e-4


def _st_onnx_equivalent(model_dir: Path, texts: list[str]) -> np.ndarray:
    """What sentence-transformers' ONNX backend computes, without Optimum: the tokenizer, a plain onnxruntime
    session's `last_hidden_state`, then sentence-transformers' own Pooling and Normalize modules."""
    from sentence_transformers.models import Normalize, Pooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sess = ort.InferenceSession(str(model_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    (hidden,) = sess.run(["last_hidden_state"], feed)
    features = {"token_embeddings": torch.from_numpy(hidden),
                "attention_mask": torch.from_numpy(enc["attention_mask"].astype(np.int64))}
    pooling = Pooling.load(str(model_dir / "1_Pooling"))
    return Normalize()(pooling(features))["sentence_embedding"].numpy()


def test_sentence_transformers_onnx_path_equals_our_output(applied: Path) -> None:
    """ST's ONNX backend reads `last_hidden_state` and pools/normalises itself: same as `sentence_embedding`."""
    theirs = _st_onnx_equivalent(applied, TEXTS)
    sess = ort.InferenceSession(str(applied / ONNX_FILE), providers=["CPUExecutionProvider"])
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(applied)(TEXTS, padding=True, truncation=True, max_length=64,
                                                 return_tensors="np")
    (ours,) = sess.run(["sentence_embedding"], {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})
    assert np.abs(ours - theirs).max() < 1e-5


def test_sentence_transformers_onnx_backend_when_optimum_is_installed(applied: Path) -> None:
    pytest.importorskip("optimum.onnxruntime")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(applied), backend="onnx", device="cpu")
    theirs = st.encode(TEXTS, convert_to_numpy=True)
    assert np.abs(theirs - _st_onnx_equivalent(applied, TEXTS)).max() < 1e-5


def test_plain_loaders_fail_loudly(applied: Path) -> None:
    """A compressed directory is not a plain checkpoint: no random-initialised model comes back."""
    import transformers as tr
    from sentence_transformers import SentenceTransformer

    with pytest.raises(OSError, match="no file named model.safetensors"):
        tr.AutoModel.from_pretrained(applied)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        SentenceTransformer(str(applied), device="cpu")


def test_directories_with_the_old_file_name_still_load(applied: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(applied, old)
    (old / MODEL_FILE).rename(old / LEGACY_MODEL_FILE)
    a, b = load_model(str(applied)), load_model(str(old))
    batch = a.make_batches(TEXTS, 4)[0]
    with torch.no_grad():
        assert torch.equal(a.output(a.model, batch), b.output(b.model, batch))
    (old / LEGACY_MODEL_FILE).unlink()
    with pytest.raises(Exception, match="no slimformer.safetensors"):
        load_model(str(old))


def test_apply_onnx_over_the_recipes_budget_exits_2(st_dir, recipe: Path, tmp_path: Path) -> None:
    rec = yaml.safe_load(recipe.read_text())
    rec["provenance"] = {"budget": {"bytes": 1000, "deploy": "onnx"}}
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(rec))
    out = tmp_path / "out"
    res = invoke("apply", small, "--model", st_dir, "--out", out, "--onnx", "--samples", 8)
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert "over the recipe's budget of 1,000 bytes" in res.stderr
    assert not (out / ONNX_FILE).exists()


def test_classifier_exports_logits(tmp_path: Path, minilm_tokenizer) -> None:
    import transformers as tr

    from slimformer.export import export_onnx
    from slimformer.models import HFEncoderAdapter

    cfg = tr.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        vocab_size=30522, max_position_embeddings=72, num_labels=3)
    torch.manual_seed(0)
    a = HFEncoderAdapter(tr.BertForSequenceClassification(cfg).eval(), "tiny-cls", minilm_tokenizer, "mean", 32)
    info = export_onnx(a, a.model, tmp_path / "cls.onnx")
    proto = onnx.load(str(info.path))
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {p.key: p.value for p in proto.metadata_props}["kind"] == "classifier"
