"""Product-quantised embedding tiers (compression/pq.py): codes and codebook shapes, exact lookup, every row in one
tier, per-tier bytes equal the packed tensors, save/load and recipe round trips, versioned recipe field."""

from __future__ import annotations

import pytest
import torch

from slimformer.compression.apply import apply_plan
from slimformer.compression.embedding_tiers import Tier, TieredEmbedding, TierSpec, TokenRanking, tiered_bytes
from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.pq import PQ_CENTROIDS, pq_bytes, pq_decode, pq_fit, zipf_weights
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, pack_model, packed_bytes, save_compressed
from slimformer.errors import PlanError, RecipeError

EMB = "embeddings.word_embeddings"


def _spec(vocab: int) -> TierSpec:
    return TierSpec((Tier("int4", 500, 16), Tier("pq", None, 8)), TokenRanking(vocab, tuple(range(900, 0, -1)), "t"))


def test_pq_codes_are_uint8_and_decode_is_a_pure_lookup() -> None:
    torch.manual_seed(0)
    rows = torch.randn(1000, 32)
    codes, book = pq_fit(rows, 8, zipf_weights(0, 1000))
    assert codes.dtype == torch.uint8 and codes.shape == (1000, 4)
    assert book.dtype == torch.float16 and book.shape == (4, PQ_CENTROIDS, 8)
    dec = pq_decode(codes, book)
    for j in range(4):  # row i, sub-space j is exactly centroid codes[i, j] of codebook j
        assert torch.equal(dec[:, 8 * j:8 * j + 8], book[j][codes[:, j].long()].float())
    assert torch.equal(pq_fit(rows, 8, zipf_weights(0, 1000))[0], codes)  # deterministic
    # a fit that beats the mean row by far, and gets better with narrower sub-vectors
    err8 = (dec - rows).square().mean()
    err2 = (pq_decode(*pq_fit(rows, 2)) - rows).square().mean()
    assert err2 < err8 < 0.8 * rows.var()


def test_at_most_256_rows_are_stored_exactly_up_to_fp16() -> None:
    torch.manual_seed(1)
    rows = torch.randn(200, 16)
    dec = pq_decode(*pq_fit(rows, 4))
    assert torch.equal(dec, rows.half().float())


def test_pq_tier_covers_every_row_once_and_bytes_equal_the_packed_tensors(bert64) -> None:
    vocab, dim = bert64.unit(EMB).shape
    spec = _spec(vocab)
    assert torch.bincount(spec.assignment(vocab), minlength=2).tolist() == [500, vocab - 500]
    mod = TieredEmbedding(vocab, dim, spec)
    mod.set_table(torch.randn(vocab, dim))
    packed = mod.pack("e")
    assert packed["e.tier1.codes"].dtype == torch.uint8 and packed["e.tier1.codebook"].dtype == torch.float16
    assert packed_bytes({k: v for k, v in packed.items() if k.startswith("e.tier1.")}) == \
        pq_bytes(vocab - 500, dim, 8) == (vocab - 500) * dim // 8 + dim // 8 * PQ_CENTROIDS * 8 * 2
    assert packed_bytes(packed) == mod.stored_bytes() == tiered_bytes((vocab, dim), spec)
    plan = CompressionPlan({EMB: UnitSpec(tiers=spec)})
    model = apply_plan(bert64, plan)
    assert plan_memory(bert64, plan, "safetensors").total_bytes == packed_bytes(pack_model(model))


def test_pq_save_load_and_recipe_round_trip(bert64, tmp_path) -> None:
    vocab, _ = bert64.unit(EMB).shape
    plan = CompressionPlan({EMB: UnitSpec(tiers=_spec(vocab))})
    model = apply_plan(bert64, plan)
    rec = Recipe.from_plan(plan, bert64)
    assert rec.embedding_tiers is not None and rec.embedding_tiers.version == 2
    assert "{tier: pq, group_size: 8}" in rec.to_yaml()
    assert Recipe.from_yaml(rec.to_yaml()).to_plan(bert64) == plan
    save_compressed(bert64, model, rec, tmp_path / "out")
    back = load_compressed(tmp_path / "out")
    assert torch.equal(back.model.get_submodule(EMB).weight, model.get_submodule(EMB).weight)
    # a tiers section without pq is still written as version 1 (older readers read it)
    int_only = TierSpec((Tier("int2", None, 16),), TokenRanking(vocab, (3,)))
    assert Recipe.from_plan(CompressionPlan({EMB: UnitSpec(tiers=int_only)}), bert64).embedding_tiers.version == 1
    old = rec.to_yaml().replace("version: 2", "version: 1")
    with pytest.raises(RecipeError, match="tier pq needs `version: 2`"):
        Recipe.from_yaml(old)


def test_bad_pq_tiers_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="tier pq needs a sub-vector width"):
        Tier("pq", None, 3)
    with pytest.raises(PlanError, match="tier pq needs a sub-vector width"):
        Tier("pq")
    with pytest.raises(PlanError, match="row width 60 is not a multiple of 8"):
        tiered_bytes((100, 60), TierSpec((Tier("pq", None, 8),), TokenRanking(100, ())))
