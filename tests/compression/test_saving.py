"""save_compressed / load_compressed: the packed directory rebuilds the compressed model exactly, and a
save never clobbers foreign directories or leaves partial output behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimformer.compression import saving
from slimformer.compression.apply import apply_plan
from slimformer.compression.modules import FactorizedEmbedding, LowRankLinear, SlimLinear
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import (
    MODEL_FILE,
    RECIPE_FILE,
    load_any,
    load_compressed,
    pack_model,
    packed_bytes,
    save_compressed,
)
from slimformer.errors import ModelLoadError
from slimformer.fileio import TMP_TAG
from slimformer.models import HFEncoderAdapter, TimmViTAdapter, load


def _bert_plan(a) -> CompressionPlan:
    units = {}
    for u in a.units:
        if u.role == "embedding":
            units[u.name] = UnitSpec(rank=16, bits=4, group_size=8)
        elif u.role == "query":
            units[u.name] = UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=16)
        elif u.role == "key":
            units[u.name] = UnitSpec(sparsity=0.6, bits=8)
        elif u.role == "value":
            units[u.name] = UnitSpec(bits=16)
        elif u.role == "attn_out":
            units[u.name] = UnitSpec(rank=8, sparsity=0.3)
        elif u.role == "ffn_in":
            units[u.name] = UnitSpec(rank=12, bits=8, group_size=16)
        else:
            units[u.name] = UnitSpec(sparsity=0.5, pattern="2:4", bits=16)
    n = len(a.layers)
    return CompressionPlan(units, layers={0: LayerSpec(2, 24), 2: LayerSpec(neurons_kept=40)},
                           sharing=SharingSpec(((1, n - 1),), "attention"))


def _vit_plan(a) -> CompressionPlan:
    units = {}
    for u in a.units:
        units[u.name] = {"qkv": UnitSpec(bits=4, group_size=8), "attn_out": UnitSpec(rank=8, bits=8),
                         "ffn_in": UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=16),
                         "ffn_out": UnitSpec(sparsity=0.7)}[u.role]
    return CompressionPlan(units, layers={0: LayerSpec(heads_kept=3, neurons_kept=64)},
                           sharing=SharingSpec(((0, 1),), "ffn"))


@torch.no_grad()
def _out(adapter, model, data) -> torch.Tensor:
    return torch.cat([adapter.output(model, b) for b in data])


@pytest.mark.parametrize("family", ["bert", "mpnet", "vit"])
def test_round_trip_reproduces_the_compressed_model(make_tiny, batches, family, tmp_path) -> None:
    a = make_tiny(family)
    plan = _vit_plan(a) if family == "vit" else _bert_plan(a)
    model = apply_plan(a, plan)
    recipe = Recipe.from_plan(plan, a, provenance={"study": family})
    out_dir = save_compressed(a, model, recipe, tmp_path / "packed")
    assert out_dir == tmp_path / "packed"

    files = {p.name for p in out_dir.iterdir()}
    assert {MODEL_FILE, RECIPE_FILE, "config.json", "slimformer_model.json"} <= files
    if family != "vit":
        assert "tokenizer.json" in files or "vocab.txt" in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp directory left behind"
    with safe_open(str(out_dir / MODEL_FILE), "pt") as f:
        assert f.metadata() == {"format": "slimformer-packed-v1"}
    assert json.loads((out_dir / "slimformer_model.json").read_text())["family"] == a.family

    loaded = load_compressed(out_dir)
    assert type(loaded) is type(a)
    assert loaded.recipe == recipe
    assert loaded.model_id == a.model_id
    data = batches(a)
    expected = _out(a, model, data)
    got = _out(loaded, loaded.model, data)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # the packed tensors themselves survive bit for bit
    p1, p2 = pack_model(model), pack_model(loaded.model)
    assert p1.keys() == p2.keys()
    assert all(p1[k].dtype == p2[k].dtype and torch.equal(p1[k], p2[k]) for k in p1)
    assert packed_bytes(p2) == packed_bytes(load_file(str(out_dir / MODEL_FILE)))

    # the structure came back too: factorised, low-rank, quantised, pruned and shared modules
    mods = dict(loaded.model.named_modules())
    for u in a.units:
        ref_mod = model.get_submodule(u.name)
        got_mod = loaded.model.get_submodule(u.name)
        assert type(got_mod) is type(ref_mod), u.name
        if isinstance(ref_mod, SlimLinear):
            assert got_mod.fmt == ref_mod.fmt
            assert torch.equal(got_mod.weight, ref_mod.weight)
    if family != "vit":
        assert isinstance(mods["embeddings.word_embeddings"], FactorizedEmbedding)
        rep, twin = a.layers[1], a.layers[-1]
        for p in rep.attention_scope:
            assert loaded.model.get_submodule(twin.path + p[len(rep.path):]) is loaded.model.get_submodule(p)
        info = a.layers[0]
        assert getattr(loaded.model.get_submodule(info.attention_path), info.heads_attr) == 2
    else:
        assert isinstance(mods["blocks.0.attn.proj"], LowRankLinear)
        assert loaded.model.blocks[1].mlp is loaded.model.blocks[0].mlp


def test_load_any_opens_a_compressed_directory(tiny_bert, batches, tmp_path) -> None:
    plan = CompressionPlan({u.name: UnitSpec(bits=8) for u in tiny_bert.units if u.role == "ffn_in"})
    model = apply_plan(tiny_bert, plan)
    save_compressed(tiny_bert, model, Recipe.from_plan(plan, tiny_bert), tmp_path / "m")
    with pytest.raises(ModelLoadError, match="compressed slimformer output.*load_any"):
        load(str(tmp_path / "m"))  # models sits below compression: it points one layer up
    loaded = load_any(str(tmp_path / "m"))
    assert isinstance(loaded, HFEncoderAdapter) and loaded.tokenizer is not None
    data = loaded.make_batches(["a tiny test sentence", "another one"], 2)
    assert torch.allclose(_out(loaded, loaded.model, data), _out(tiny_bert, model, data), atol=1e-6, rtol=0)


def test_save_into_existing_foreign_directory_raises(tiny_vit, tmp_path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    model = apply_plan(tiny_vit, CompressionPlan())
    with pytest.raises(ModelLoadError, match="exists and is not a slimformer output"):
        save_compressed(tiny_vit, model, Recipe.from_plan(CompressionPlan(), tiny_vit), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_save_into_empty_or_previous_output_directory(tiny_vit, tmp_path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    plan4 = CompressionPlan({u.name: UnitSpec(bits=4) for u in tiny_vit.units})
    save_compressed(tiny_vit, apply_plan(tiny_vit, CompressionPlan()), Recipe.from_plan(CompressionPlan(), tiny_vit),
                    out)
    first = (out / MODEL_FILE).stat().st_size
    (out / "stale.txt").write_text("from the previous run")
    save_compressed(tiny_vit, apply_plan(tiny_vit, plan4), Recipe.from_plan(plan4, tiny_vit), out)
    assert (out / MODEL_FILE).stat().st_size < first
    assert not (out / "stale.txt").exists(), "a previous slimformer output is replaced as a whole"
    assert load_compressed(out).recipe == Recipe.from_plan(plan4, tiny_vit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_save_leaves_no_partial_directory(tiny_vit, tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    model = apply_plan(tiny_vit, CompressionPlan())
    recipe = Recipe.from_plan(CompressionPlan(), tiny_vit)
    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(tiny_vit, model, recipe, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    # a previous output survives a failed overwrite untouched
    monkeypatch.setattr(saving, "save_file", save_file)
    save_compressed(tiny_vit, model, recipe, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError):
        save_compressed(tiny_vit, model, recipe, tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_load_rejects_foreign_and_damaged_directories(tiny_vit, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="missing slimformer_model.json"):
        load_compressed(tmp_path)
    out = save_compressed(tiny_vit, apply_plan(tiny_vit, CompressionPlan()),
                          Recipe.from_plan(CompressionPlan(), tiny_vit), tmp_path / "m")
    tensors = load_file(str(out / MODEL_FILE))
    del tensors["norm.weight"]
    save_file(tensors, str(out / MODEL_FILE))
    with pytest.raises(ModelLoadError, match="tensor norm.weight is missing"):
        load_compressed(out)


def test_loaded_vit_is_a_timm_adapter_with_preprocessing(tiny_vit, images, tmp_path) -> None:
    plan = _vit_plan(tiny_vit)
    model = apply_plan(tiny_vit, plan)
    loaded = load_compressed(save_compressed(tiny_vit, model, Recipe.from_plan(plan, tiny_vit), tmp_path / "v"))
    assert isinstance(loaded, TimmViTAdapter)
    assert loaded.img_size == (28, 28) and loaded.in_chans == 1
    data = loaded.make_batches(images[0][:8], 4, labels=images[1][:8])
    assert _out(loaded, loaded.model, data).shape == (8, 10)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temp_dirs_of_killed_runs_are_removed_others_kept(tiny_vit, tmp_path) -> None:
    host = socket.gethostname()
    dead = tmp_path / f".m{TMP_TAG}{host}.{_dead_pid()}.abc123"  # a killed run's leftover
    live = tmp_path / f".m{TMP_TAG}{host}.{os.getpid()}.def456"  # a running save (this very process)
    elsewhere = tmp_path / f".m{TMP_TAG}otherhost.{_dead_pid()}.ghi789"  # another machine's (shared fs)
    foreign = tmp_path / ".m.keepme"  # not ours
    for d in (dead, live, elsewhere, foreign):
        d.mkdir()
        (d / "f").write_text("x")
    save_compressed(tiny_vit, apply_plan(tiny_vit, CompressionPlan()), Recipe.from_plan(CompressionPlan(), tiny_vit),
                    tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, elsewhere.name, foreign.name])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_directory_and_files_follow_the_umask(tiny_vit, tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        out = save_compressed(tiny_vit, apply_plan(tiny_vit, CompressionPlan()),
                              Recipe.from_plan(CompressionPlan(), tiny_vit), tmp_path / "m")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "not mkdtemp's 0700"
    for f in (out / RECIPE_FILE, out / MODEL_FILE):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask
