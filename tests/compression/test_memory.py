"""plan_memory is exact: it equals the bytes pack_model writes for the compressed model, and the
safetensors file holds exactly those bytes plus its JSON header."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimformer.compression.apply import apply_plan
from slimformer.compression.memory import GROUPS, plan_memory
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec, sharing_pattern
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import MODEL_FILE, pack_model, packed_bytes, save_compressed

LINEAR_ROLES = ("query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out")


def _units(adapter, spec: UnitSpec, roles: tuple[str, ...] | None = None) -> dict[str, UnitSpec]:
    return {u.name: spec for u in adapter.units if roles is None or u.role in roles}


def _named_plans(adapter) -> dict[str, CompressionPlan]:
    """Hand-written plans covering each transform and their mixtures."""
    n = len(adapter.layers)
    inter = adapter.layers[0].intermediate
    attn = ("query", "key", "value", "qkv", "attn_out")
    plans = {
        "identity": CompressionPlan(),
        "fp16": CompressionPlan(_units(adapter, UnitSpec(bits=16))),
        "int8-channel": CompressionPlan(_units(adapter, UnitSpec(bits=8))),
        "int8-g16": CompressionPlan(_units(adapter, UnitSpec(bits=8, group_size=16))),
        "int4-g8": CompressionPlan(_units(adapter, UnitSpec(bits=4, group_size=8))),
        "int4-g24-partial-groups": CompressionPlan(_units(adapter, UnitSpec(bits=4, group_size=24))),
        "int4-g6-odd-groups": CompressionPlan(_units(adapter, UnitSpec(bits=4, group_size=6))),
        "rank4": CompressionPlan(_units(adapter, UnitSpec(rank=4), LINEAR_ROLES)),
        "rank-clamped": CompressionPlan(_units(adapter, UnitSpec(rank=500), LINEAR_ROLES)),
        "rank8-2:4-int4": CompressionPlan(_units(adapter, UnitSpec(rank=8, sparsity=0.5, pattern="2:4", bits=4,
                                                                   group_size=16), LINEAR_ROLES)),
        "sparse0.3-fp32-bitmask": CompressionPlan(_units(adapter, UnitSpec(sparsity=0.3))),
        "sparse0.1-int4-dense": CompressionPlan(_units(adapter, UnitSpec(sparsity=0.1, bits=4, group_size=8))),
        "sparse0.9-int4-bitmask": CompressionPlan(_units(adapter, UnitSpec(sparsity=0.9, bits=4))),
        "sparse0.37-int8": CompressionPlan(_units(adapter, UnitSpec(sparsity=0.37, bits=8, group_size=10))),
        "2:4-fp16": CompressionPlan(_units(adapter, UnitSpec(sparsity=0.5, pattern="2:4", bits=16))),
        "heads-neurons": CompressionPlan(layers={0: LayerSpec(heads_kept=1, neurons_kept=12),
                                                 n - 1: LayerSpec(heads_kept=3, neurons_kept=inter - 4)}),
        "heads-neurons-compressed": CompressionPlan(
            {**_units(adapter, UnitSpec(rank=4, bits=8), attn),
             **_units(adapter, UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=8), ("ffn_in", "ffn_out"))},
            layers={i: LayerSpec(heads_kept=2, neurons_kept=16) for i in range(n)}),
    }
    for scope in ("attention", "ffn", "block"):
        plans[f"share-{scope}"] = CompressionPlan(sharing=SharingSpec(groups=((0, 1),), scope=scope))
        plans[f"share-{scope}-int4-pruned"] = CompressionPlan(
            _units(adapter, UnitSpec(bits=4, group_size=8)), layers={0: LayerSpec(2, 24), 1: LayerSpec(3, 20)},
            sharing=SharingSpec(groups=((0, 1),), scope=scope))
    if n > 2:
        plans["share-cycle2-rank"] = CompressionPlan(_units(adapter, UnitSpec(rank=6, bits=16), LINEAR_ROLES),
                                                     sharing=sharing_pattern("cycle2", n, "block"))
    emb = [u.name for u in adapter.units if u.role == "embedding"]
    if emb:
        plans["embedding-rank-int4"] = CompressionPlan({emb[0]: UnitSpec(rank=12, bits=4, group_size=4)})
        plans["embedding-sparse-int8"] = CompressionPlan({emb[0]: UnitSpec(sparsity=0.6, bits=8)})
        plans["embedding-2:4-rank8"] = CompressionPlan({emb[0]: UnitSpec(rank=8, sparsity=0.5, pattern="2:4")})
    return plans


def _random_plan(adapter, rng: random.Random) -> CompressionPlan:
    """A random valid plan (2:4 only where every stored matrix keeps an input dim divisible by 4)."""
    units = {}
    for u in adapter.units:
        if rng.random() < 0.2:
            continue
        rank = rng.choice([None, None, 4, 8, 12] if u.kind == "linear" else [None, 8, 16])
        pattern = rng.choice(["unstructured", "unstructured", "2:4"])
        sparsity = 0.5 if pattern == "2:4" else rng.choice([0.0, 0.0, 0.2, 0.5, 0.8])
        bits = rng.choice([32, 16, 8, 4])
        group = rng.choice([None, 8, 16, 12]) if bits in (8, 4) else None
        units[u.name] = UnitSpec(rank, sparsity, pattern, bits, group)
    layers = {}
    for info in adapter.layers:
        if rng.random() < 0.5:
            layers[info.index] = LayerSpec(rng.choice([None, 1, 2, 3]), rng.choice([None, 16, 20, 40]))
    n = len(adapter.layers)
    sharing = SharingSpec()
    if rng.random() < 0.6:
        sharing = sharing_pattern(rng.choice(["pairs", "cycle1"]), n, rng.choice(["attention", "ffn", "block"]))
    return CompressionPlan(units, layers, sharing)


HEADER_BYTES_PER_TENSOR = 256  # safetensors JSON header: name, dtype, shape and offsets of each tensor


def _file_sizes(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(file size, JSON header length) of a safetensors file written from `tensors`."""
    save_file(tensors, str(path))
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8:8 + header])) - {"__metadata__"} == set(tensors)
    return len(raw), header


def _check_exact(adapter, plan: CompressionPlan, path: Path, label: str) -> bool:
    """Exact accounting; returns whether the 1 % file-size bound was checked (weights >= 100x the
    largest possible header)."""
    report = plan_memory(adapter, plan)
    packed = pack_model(apply_plan(adapter, plan))
    nbytes = packed_bytes(packed)
    assert report.total_bytes == nbytes, f"{label}: plan_memory {report.total_bytes} != packed {nbytes}"
    assert sum(report.by_group.values()) == report.total_bytes
    assert set(report.by_group) == set(GROUPS)
    size, header = _file_sizes(packed, path)
    assert size == 8 + header + nbytes, f"{label}: file {size} != 8 + header {header} + packed {nbytes}"
    assert header <= HEADER_BYTES_PER_TENSOR * len(packed)
    # On tiny, heavily compressed models the header alone can exceed 1 % of the weights (about 130
    # bytes per tensor); the bound is checked where weights dominate, as on real models.
    if report.total_bytes >= 100 * HEADER_BYTES_PER_TENSOR * len(packed):
        assert abs(size - report.total_bytes) <= 0.01 * report.total_bytes, f"{label}: file {size}"
        return True
    return False


def test_named_plans_are_exact_on_tiny_bert(tiny_bert, tmp_path) -> None:
    totals, file_checked = {}, 0
    for label, plan in _named_plans(tiny_bert).items():
        file_checked += _check_exact(tiny_bert, plan, tmp_path / f"{label}.safetensors", label)
        totals[label] = plan_memory(tiny_bert, plan).total_bytes
    assert file_checked >= 10, f"only {file_checked} plans large enough for the 1 % file check"
    assert totals["identity"] == plan_memory(tiny_bert, CompressionPlan()).fp32_bytes
    assert len(set(totals.values())) > len(totals) - 3, "plans should price differently"


@pytest.mark.parametrize("family", ["distilbert", "roberta", "mpnet", "vit"])
def test_named_plans_are_exact_on_other_families(make_tiny, family, tmp_path) -> None:
    adapter = make_tiny(family)
    plans = _named_plans(adapter)
    keep = ("identity", "int4-g24-partial-groups", "rank8-2:4-int4", "sparse0.3-fp32-bitmask",
            "heads-neurons-compressed", "share-attention-int4-pruned", "share-block-int4-pruned",
            "embedding-rank-int4")
    for label in keep:
        if label in plans:
            _check_exact(adapter, plans[label], tmp_path / f"{label}.safetensors", label)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "mpnet", "vit"])
def test_random_plans_are_exact(make_tiny, family, tmp_path) -> None:
    adapter = make_tiny(family)
    rng = random.Random(f"memory-{family}")
    for i in range(4):
        plan = _random_plan(adapter, rng)
        _check_exact(adapter, plan, tmp_path / f"{i}.safetensors", f"{family} random plan {i}")


def test_identity_is_the_fp32_model(tiny_any) -> None:
    report = plan_memory(tiny_any, CompressionPlan())
    assert report.total_bytes == report.fp32_bytes == packed_bytes(pack_model(tiny_any.model))
    params = sum(p.numel() for p in tiny_any.model.parameters())
    assert report.fp32_bytes == 4 * params
    assert report.fraction == 1.0 and report.percent == 100.0


def test_fewer_bits_fewer_bytes(tiny_any) -> None:
    sizes = []
    for bits in (32, 16, 8, 4):
        report = plan_memory(tiny_any, CompressionPlan(_units(tiny_any, UnitSpec(bits=bits))))
        sizes.append(report.total_bytes)
        if bits == 32:
            per_unit32 = report.per_unit
        else:
            assert all(report.per_unit[n] < per_unit32[n] for n in per_unit32)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    # smaller groups cost more scales
    g8 = plan_memory(tiny_any, CompressionPlan(_units(tiny_any, UnitSpec(bits=4, group_size=8)))).total_bytes
    g16 = plan_memory(tiny_any, CompressionPlan(_units(tiny_any, UnitSpec(bits=4, group_size=16)))).total_bytes
    assert sizes[-1] < g16 < g8


def test_lower_rank_fewer_bytes(tiny_any) -> None:
    sizes = [plan_memory(tiny_any, CompressionPlan(_units(tiny_any, UnitSpec(rank=r, bits=8), LINEAR_ROLES)))
             .total_bytes for r in (16, 12, 8, 4, 1)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_more_sparsity_pruning_and_sharing_fewer_bytes(tiny_bert) -> None:
    a = tiny_bert

    def total(plan: CompressionPlan) -> int:
        return plan_memory(a, plan).total_bytes

    sparse = [total(CompressionPlan(_units(a, UnitSpec(sparsity=s, bits=8)))) for s in (0.0, 0.6, 0.8, 0.95)]
    assert sparse == sorted(sparse, reverse=True) and len(set(sparse)) == 4
    heads = [total(CompressionPlan(layers={0: LayerSpec(heads_kept=h)})) for h in (4, 3, 2, 1)]
    assert heads == sorted(heads, reverse=True) and len(set(heads)) == 4
    neurons = [total(CompressionPlan(layers={0: LayerSpec(neurons_kept=k)})) for k in (64, 32, 8)]
    assert neurons == sorted(neurons, reverse=True) and len(set(neurons)) == 3
    base = total(CompressionPlan())
    shared = {s: total(CompressionPlan(sharing=SharingSpec(((0, 1),), s))) for s in ("attention", "ffn", "block")}
    assert shared["block"] < min(shared["attention"], shared["ffn"]) <= max(shared.values()) < base
    assert total(CompressionPlan(sharing=sharing_pattern("cycle1", 4))) < shared["block"]


def test_report_breakdown(tiny_bert) -> None:
    a = tiny_bert
    plan = CompressionPlan(_units(a, UnitSpec(bits=8), ("ffn_in",)), sharing=SharingSpec(((0, 1),), "attention"))
    report = plan_memory(a, plan)
    l1_attn = [u.name for u in a.units if u.layer == 1 and u.role in ("query", "key", "value", "attn_out")]
    assert all(report.per_unit[n] == 0 for n in l1_attn)
    emb = a.units[0]
    assert report.per_unit[emb.name] == 4 * emb.shape[0] * emb.shape[1]
    assert report.by_group["embeddings"] > report.per_unit[emb.name]  # + position/type embeddings, norm
    ffn_in = next(u for u in a.units if u.role == "ffn_in")
    assert report.per_unit[ffn_in.name] == ffn_in.shape[0] * ffn_in.shape[1] + 4 * ffn_in.shape[0] * 2


@pytest.mark.slow
def test_real_minilm_plan_is_exact_and_saved_file_matches(minilm, tmp_path) -> None:
    a = minilm
    attn = ("query", "key", "value", "attn_out")
    units = {**_units(a, UnitSpec(bits=8, group_size=64), attn),
             **_units(a, UnitSpec(rank=96, bits=4, group_size=32), ("ffn_in",)),
             **_units(a, UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=32), ("ffn_out",)),
             **_units(a, UnitSpec(bits=16), ("embedding",))}  # int4 on the 30522-row table costs seconds
    plan = CompressionPlan(units, layers={i: LayerSpec(heads_kept=8, neurons_kept=1024) for i in range(3)},
                           sharing=SharingSpec(((4, 5),), "attention"))
    report = plan_memory(a, plan)
    model = apply_plan(a, plan)
    assert report.total_bytes == packed_bytes(pack_model(model))
    assert 0.3 < report.fraction < 0.33
    out = save_compressed(a, model, Recipe.from_plan(plan, a), tmp_path / "out")
    size = (out / MODEL_FILE).stat().st_size
    assert abs(size - report.total_bytes) <= 0.01 * report.total_bytes
    # the sentence-transformers pooling config travels with the compressed model
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
