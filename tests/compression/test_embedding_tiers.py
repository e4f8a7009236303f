"""Frequency-tiered embedding tables: deterministic assignment covering every row once, exact bytes, 2-bit levels,
save/load round trip (the ONNX side is tests/export/test_tiered_export.py)."""

from __future__ import annotations

import pytest
import torch

from slimformer.compression.apply import apply_plan
from slimformer.compression.embedding_tiers import (
    Tier,
    TieredEmbedding,
    TierSpec,
    TokenRanking,
    count_tokens,
    pack_int2,
    quantize_int2,
    ranking_from_counts,
    tiered_bytes,
    unpack_int2,
)
from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, pack_model, packed_bytes, save_compressed
from slimformer.errors import PlanError

EMB = "embeddings.word_embeddings"


def _spec(vocab: int, frequent: tuple[int, ...] = (5, 3, 9, 1)) -> TierSpec:
    ranking = TokenRanking(vocab, frequent, "test")
    return TierSpec((Tier("int8", 3), Tier("int4", 5, 16), Tier("int2", None, 16)), ranking)


def test_ranking_is_deterministic_by_count_then_id() -> None:
    counts = torch.tensor([0, 4, 0, 7, 4, 0, 1])
    r = ranking_from_counts(counts)
    assert r.frequent == (3, 1, 4, 6)  # 7, then the two 4s by id, then 1; unseen ids follow in id order
    assert r.order.tolist() == [3, 1, 4, 6, 0, 2, 5]
    assert ranking_from_counts(counts.clone()) == r and hash(ranking_from_counts(counts)) == hash(r)
    assert count_tokens([[1, 1, 3], [3, 6]], 7).tolist() == [0, 2, 0, 2, 0, 0, 1]


def test_assignment_covers_every_row_exactly_once() -> None:
    vocab = 40
    spec = _spec(vocab)
    tier = spec.assignment(vocab)
    assert tier.shape == (vocab,) and spec.sizes(vocab) == [3, 5, 32]
    assert torch.bincount(tier, minlength=3).tolist() == [3, 5, 32]
    assert tier[[5, 3, 9]].tolist() == [0, 0, 0] and tier[1] == 1 and tier[0] == 1  # rank 4, 5 -> int4
    assert torch.equal(spec.assignment(vocab), tier)
    # tiers past the end of the table get no rows; the last always takes the rest
    small = TierSpec((Tier("int8", 6), Tier("int2", None, 16)), TokenRanking(4, (2,)))
    assert small.sizes(4) == [4, 0]


def test_two_bit_codes_use_at_most_four_levels_and_round_trip() -> None:
    torch.manual_seed(0)
    w = torch.randn(50, 64)
    q = quantize_int2(w, 16)
    assert set(q.codes.unique().tolist()) <= {-2, -1, 0, 1}
    deq = q.codes.float() * q.scales.repeat_interleave(16, 1)
    for row in deq:
        for g in row.reshape(4, 16):
            assert g.unique().numel() <= 4
    assert torch.equal(unpack_int2(pack_int2(q.codes), q.codes.numel()).reshape(q.codes.shape), q.codes)
    # error well below the table's own spread: the clipping search picks useful scales
    assert (deq - w).square().mean() < 0.2 * w.square().mean()


def test_module_bytes_equal_packed_tensors_and_plan_memory(bert64) -> None:
    vocab, dim = bert64.unit(EMB).shape
    spec = _spec(vocab, tuple(range(100, 1100)))
    mod = TieredEmbedding(vocab, dim, spec)
    mod.set_table(torch.randn(vocab, dim))
    packed = mod.pack("e")
    assert packed_bytes(packed) == mod.stored_bytes() == tiered_bytes((vocab, dim), spec)
    assert packed["e.row_rank"].dtype == torch.int16
    plan = CompressionPlan({EMB: UnitSpec(tiers=spec)})
    model = apply_plan(bert64, plan)
    assert isinstance(model.get_submodule(EMB), TieredEmbedding)
    assert plan_memory(bert64, plan, "safetensors").total_bytes == packed_bytes(pack_model(model))


def test_effective_rows_are_each_tiers_dequantised_codes(bert64) -> None:
    vocab, dim = bert64.unit(EMB).shape
    spec = _spec(vocab, tuple(range(200)))
    w = bert64.model.get_submodule(EMB).weight.detach()
    mod = TieredEmbedding(vocab, dim, spec)
    mod.set_table(w)
    order = spec.ranking.order
    start = 0
    for n, c, s, t in zip(mod.sizes, mod.tier_codes, mod.tier_scales, spec.tiers, strict=True):
        g = dim if t.group_size is None else t.group_size
        rows = c.float() * s.repeat_interleave(g, 1)[:, :dim]
        assert torch.equal(mod.weight[order[start:start + n]], rows)
        start += n
    int8_err = (mod.weight[order[:3]] - w[order[:3]]).abs().max()
    int2_err = (mod.weight[order[8:]] - w[order[8:]]).abs().max()
    assert int8_err < int2_err


def test_save_load_round_trip_through_the_recipe(bert64, tmp_path) -> None:
    vocab, _ = bert64.unit(EMB).shape
    plan = CompressionPlan({EMB: UnitSpec(tiers=_spec(vocab, tuple(range(300, 0, -1))))})
    model = apply_plan(bert64, plan)
    rec = Recipe.from_plan(plan, bert64)
    assert rec.to_plan(bert64) == plan
    save_compressed(bert64, model, rec, tmp_path / "out")
    back = load_compressed(tmp_path / "out")
    assert torch.equal(back.model.get_submodule(EMB).weight, model.get_submodule(EMB).weight)


def test_bad_tiers_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="unknown embedding tier 'int3'"):
        Tier("int3", 10)
    with pytest.raises(PlanError, match="only the last tier"):
        TierSpec((Tier("int8"), Tier("int2", None, 64)), TokenRanking(10, ()))
    with pytest.raises(PlanError, match="tier int2 needs a group_size"):
        Tier("int2")
    with pytest.raises(PlanError, match="leave bits 32"):
        UnitSpec(bits=4, tiers=TierSpec((Tier("int2", None, 64),), TokenRanking(10, ())))
    with pytest.raises(PlanError, match="ranking has 10 ids, the table 12 rows"):
        TierSpec((Tier("int2", None, 64),), TokenRanking(10, ())).sizes(12)


def test_recovery_keeps_a_tiered_table_frozen(bert64) -> None:
    from slimformer.recovery.trainable import freeze_, make_trainable_

    vocab, _ = bert64.unit(EMB).shape
    plan = CompressionPlan({EMB: UnitSpec(tiers=_spec(vocab, tuple(range(50)))),
                            **{u.name: UnitSpec(bits=8) for u in bert64.units if u.kind == "linear"}})
    model = apply_plan(bert64, plan)
    state = make_trainable_(model)
    table = model.get_submodule(EMB).weight
    assert not table.requires_grad and all(p is not table for p in state.weights)
    freeze_(model, state)
