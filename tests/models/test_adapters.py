"""Model adapters: role discovery, head geometry, batching, persistence and load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimformer.errors import ModelLoadError
from slimformer.models import HFEncoderAdapter, TimmViTAdapter, create_vit, load, resolve_model_dir, save_timm_dir
from slimformer.models.base import ROLES
from slimformer.models.discover import describe_model, find_blocks

HF_ROLE_ORDER = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
BLOCK_PATHS = {"bert": "encoder.layer", "distilbert": "transformer.layer", "roberta": "encoder.layer",
               "mpnet": "encoder.layer", "vit": "blocks"}
LAYERS = {"bert": 4, "distilbert": 3, "roberta": 3, "mpnet": 3, "vit": 2}


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "mpnet", "vit"])
def test_role_discovery(make_tiny, family) -> None:
    a = make_tiny(family)
    n = LAYERS[family]
    assert len(a.layers) == n
    per_layer = ("qkv", "attn_out", "ffn_in", "ffn_out") if family == "vit" else HF_ROLE_ORDER
    linear = [u for u in a.units if u.kind == "linear"]
    assert [(u.layer, u.role) for u in linear] == [(i, r) for i in range(n) for r in per_layer]
    assert all(u.role in ROLES for u in a.units)
    assert len(set(a.unit_names)) == len(a.units)
    emb = [u for u in a.units if u.role == "embedding"]
    if family == "vit":
        assert emb == []
        assert len(a.units) == 4 * n
    else:
        assert len(emb) == 1 and a.units[0] is emb[0]
        assert emb[0].layer is None and emb[0].shape == (30522, 32) and not emb[0].has_bias
        assert a.model.get_submodule(emb[0].name) is a.model.get_input_embeddings()
        assert len(a.units) == 1 + 6 * n
    hidden, inter = 32, (128 if family == "vit" else 64)
    for info in a.layers:
        assert info.path == f"{BLOCK_PATHS[family]}.{info.index}"
        assert info.num_heads == 4 and info.head_dim == 8 and info.intermediate == inter
        assert getattr(a.model.get_submodule(info.attention_path), info.heads_attr) == 4
        units = {u.role: u for u in a.units if u.layer == info.index}
        if family == "vit":
            assert info.qkv_units == (units["qkv"].name,) and units["qkv"].shape == (3 * hidden, hidden)
        else:
            assert info.qkv_units == tuple(units[r].name for r in ("query", "key", "value"))
            assert all(units[r].shape == (hidden, hidden) for r in ("query", "key", "value"))
        assert info.attn_out_unit == units["attn_out"].name and units["attn_out"].shape == (hidden, hidden)
        assert info.ffn_in_unit == units["ffn_in"].name and units["ffn_in"].shape == (inter, hidden)
        assert info.ffn_out_unit == units["ffn_out"].name and units["ffn_out"].shape == (hidden, inter)
        for u in units.values():
            assert u.name.startswith(info.path + ".")
            mod = a.model.get_submodule(u.name)
            assert isinstance(mod, torch.nn.Linear) and tuple(mod.weight.shape) == u.shape
            assert u.has_bias == (mod.bias is not None)
            assert u.params == mod.weight.numel() + (0 if mod.bias is None else mod.bias.numel())
        # the sharing scopes cover the units of their role and nothing of the other scope
        attn_units = [u.name for r, u in units.items() if r in ("query", "key", "value", "qkv", "attn_out")]
        ffn_units = [units["ffn_in"].name, units["ffn_out"].name]
        assert all(any(n.startswith(p + ".") for p in info.attention_scope) for n in attn_units)
        assert all(any(n.startswith(p + ".") for p in info.ffn_scope) for n in ffn_units)
        assert not any(any(n.startswith(p + ".") for p in info.ffn_scope) for n in attn_units)
        assert not any(any(n.startswith(p + ".") for p in info.attention_scope) for n in ffn_units)


def test_hf_adapter_outputs_and_pooling(tiny_hf, minilm_tokenizer) -> None:
    a = tiny_hf
    assert a.kind == "encoder" and a.pooling == "mean" and a.hidden == 32
    assert getattr(a.model, "pooler", None) is None
    batches = a.make_batches(["one", "two words", "a somewhat longer third sentence", "four"], 3)
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [3, 1]
    assert batches[0].labels is None
    out = a.output(a.model, batches[0])
    assert out.shape == (3, 32)
    with torch.no_grad():
        hidden = a.model(**batches[0].inputs).last_hidden_state
    mask = batches[0].inputs["attention_mask"]
    n0 = int(mask[0].sum())
    assert torch.allclose(out[0], hidden[0, :n0].mean(0), atol=1e-6)
    a.pooling = "cls"
    assert torch.equal(a.output(a.model, batches[0]), hidden[:, 0])
    labelled = a.make_batches(["x", "y"], 2, labels=[1, 0])
    assert labelled[0].labels.tolist() == [1, 0]


def test_hf_adapter_without_tokenizer_cannot_batch(make_tiny) -> None:
    a = make_tiny("bert")
    a.tokenizer = None
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        a.make_batches(["x"], 1)


def test_vit_adapter_preprocess_and_output(tiny_vit, images) -> None:
    a = tiny_vit
    assert a.kind == "classifier" and a.img_size == (28, 28) and a.in_chans == 1
    imgs, labels = images
    batches = a.make_batches(imgs[:10], 4, labels=labels[:10])
    assert [b.inputs["x"].shape for b in batches] == [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    assert batches[0].labels.dtype == torch.long and batches[0].labels.tolist() == labels[:4].tolist()
    x = batches[0].inputs["x"]
    expected = (torch.as_tensor(imgs[:4], dtype=torch.float32)[:, None] / 255.0 - a.mean[0]) / a.std[0]
    assert torch.allclose(x, expected, atol=1e-6)
    assert a.output(a.model, batches[0]).shape == (4, 10)
    rgb = a.preprocess(np.stack([imgs[:2]] * 3, axis=-1))
    assert rgb.shape == (2, 1, 28, 28) and torch.allclose(rgb, a.preprocess(imgs[:2]), atol=1e-6)


def test_vit_resizes_and_expands_channels() -> None:
    torch.manual_seed(0)
    a = create_vit("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, in_chans=3, num_classes=4, depth=1,
                                                 embed_dim=32, num_heads=2))
    assert a.img_size == (32, 32) and a.in_chans == 3
    x = a.preprocess(np.zeros((2, 28, 28), dtype=np.uint8))
    assert x.shape == (2, 3, 32, 32)
    assert len(a.layers) == 1 and a.layers[0].num_heads == 2 and a.layers[0].head_dim == 16


def test_create_vit_unknown_architecture() -> None:
    with pytest.raises(ModelLoadError, match="vit_does_not_exist"):
        create_vit("vit_does_not_exist", {})


def test_timm_dir_round_trip(tiny_vit, images, tmp_path) -> None:
    save_timm_dir(tiny_vit, tmp_path / "vit")
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 10
    loaded = load(str(tmp_path / "vit"))
    assert isinstance(loaded, TimmViTAdapter) and loaded.source_dir == tmp_path / "vit"
    batch = tiny_vit.make_batches(images[0][:4], 4)[0]
    with torch.no_grad():
        assert torch.equal(loaded.output(loaded.model, batch), tiny_vit.output(tiny_vit.model, batch))
    (tmp_path / "vit" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing model.safetensors"):
        load(str(tmp_path / "vit"))


def test_hf_dir_round_trip(tiny_bert, minilm_tokenizer, tmp_path) -> None:
    d = tmp_path / "bert"
    tiny_bert.model.save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    loaded = load(str(d))
    assert isinstance(loaded, HFEncoderAdapter) and loaded.model_id == str(d)
    assert loaded.unit_names == tiny_bert.unit_names
    assert loaded.pooling == "mean" and loaded.max_length == 128
    batch = tiny_bert.make_batches(["hello there", "general kenobi"], 2)[0]
    with torch.no_grad():
        assert torch.allclose(loaded.output(loaded.model, batch), tiny_bert.output(tiny_bert.model, batch),
                              atol=1e-6)


def test_missing_path_raises(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"model path .*nowhere' does not exist"):
        load(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("./definitely/not/here")


def test_directory_without_config_raises(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path))


def test_file_instead_of_directory_raises(tmp_path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="is a file; pass the directory"):
        load(str(f))


def test_invalid_config_json_raises(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config.json: invalid JSON"):
        load(str(tmp_path))


def test_config_without_model_type_raises(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="not a transformers model directory"):
        load(str(tmp_path))


def test_model_without_blocks_raises() -> None:
    with pytest.raises(ModelLoadError, match="no list of Transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    blocks = torch.nn.Module()
    blocks.layers = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))])
    with pytest.raises(ModelLoadError, match="could not identify"):
        describe_model(blocks, 8)


def test_resolve_minilm_id(minilm_dir) -> None:
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "minilm-l6"):
        assert resolve_model_dir(name) == (minilm_dir, "sentence-transformers/all-MiniLM-L6-v2")


@pytest.mark.slow
def test_real_minilm_adapter(minilm, texts) -> None:
    a = minilm
    assert a.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(a.units) == 37 and len(a.layers) == 6
    assert a.pooling == "mean" and a.kind == "encoder" and a.max_length == 256
    assert a.units[0].role == "embedding" and a.units[0].shape == (30522, 384)
    for info in a.layers:
        assert info.num_heads == 12 and info.head_dim == 32 and info.intermediate == 1536
    assert [u.role for u in a.units[1:7]] == list(HF_ROLE_ORDER)
    batches = a.make_batches(texts[:4], 4)
    with torch.no_grad():
        out = a.output(a.model, batches[0])
    assert out.shape == (4, 384) and torch.isfinite(out).all()
    sims = torch.nn.functional.normalize(out, dim=-1) @ torch.nn.functional.normalize(out, dim=-1).T
    assert float(sims.diagonal().min()) > 0.999 and float(sims.fill_diagonal_(0).max()) < 0.95
    assert len(a.weights_sha256()) == 64 and a.weights_sha256() == a.weights_sha256()
