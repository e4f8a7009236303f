"""apply_plan on real module trees: identity, low rank, sparsity, quantisation, sharing, structured
pruning, determinism, the decomposition cache and data-aware low rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimformer.compression import ops
from slimformer.compression.apply import (
    DecompositionCache,
    apply_plan,
    collect_activation_scales,
    get_module,
)
from slimformer.compression.modules import FactorizedEmbedding, LowRankLinear, SlimEmbedding, SlimLinear
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec
from slimformer.compression.plan_semantics import canonical_plan, layer_path_swap
from slimformer.compression.saving import pack_model
from slimformer.errors import PlanError
from slimformer.models import HFEncoderAdapter, TimmViTAdapter


def _all_units(adapter, spec: UnitSpec, roles: tuple[str, ...] | None = None) -> CompressionPlan:
    return CompressionPlan({u.name: spec for u in adapter.units if roles is None or u.role in roles})


def _stored(model: nn.Module) -> list[tuple[str, SlimLinear | SlimEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SlimLinear, SlimEmbedding))]


def _linear_units(adapter):
    return [u for u in adapter.units if u.kind == "linear"]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- identity and fp16 -------------------------------------------------------------------------------
def test_identity_plan_reproduces_outputs_exactly(tiny_any, batches, run_outputs) -> None:
    data = batches(tiny_any)
    ref = run_outputs(tiny_any, tiny_any.model, data)
    before = _state(tiny_any.model)
    for plan in (CompressionPlan(), _all_units(tiny_any, UnitSpec()),
                 CompressionPlan(layers={0: LayerSpec(tiny_any.layers[0].num_heads,
                                                      tiny_any.layers[0].intermediate)})):
        model = apply_plan(tiny_any, plan)
        assert model is not tiny_any.model
        assert not _stored(model), "identity specs must leave every module untouched"
        assert torch.equal(run_outputs(tiny_any, model, data), ref)
    after = tiny_any.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the reference model was mutated"


def test_fp16_weights_are_fp16_representable_and_outputs_close(tiny_any, batches, run_outputs) -> None:
    data = batches(tiny_any)
    ref = run_outputs(tiny_any, tiny_any.model, data)
    model = apply_plan(tiny_any, _all_units(tiny_any, UnitSpec(bits=16)))
    stored = _stored(model)
    assert len(stored) == len(tiny_any.units)
    for name, m in stored:
        assert m.fmt.bits == 16
        assert m.codes is None and m.scales is None
        w = m.weight.detach()
        assert w.dtype == torch.float32
        assert torch.equal(w, w.half().float()), name
        orig = get_module(tiny_any.model, name).weight.detach()
        assert torch.equal(w, orig.half().float()), name
    out = run_outputs(tiny_any, model, data)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-2, atol=2e-3)


# -- low rank ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4, 12])
def test_low_rank_linear_has_rank_at_most_r(tiny_any, batches, run_outputs, rank) -> None:
    model = apply_plan(tiny_any, _all_units(tiny_any, UnitSpec(rank=rank), roles=(
        "query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out")))
    for u in _linear_units(tiny_any):
        m = get_module(model, u.name)
        orig = get_module(tiny_any.model, u.name)
        assert isinstance(m, LowRankLinear), u.name
        out_f, in_f = u.shape
        assert m.rank == rank
        assert m.down.weight.shape == (rank, in_f) and m.up.weight.shape == (out_f, rank)
        assert m.down.bias is None
        assert torch.equal(m.up.bias, orig.bias)
        assert int(torch.linalg.matrix_rank(m.up.weight @ m.down.weight)) <= rank
        x = torch.randn(5, in_f)
        assert torch.allclose(m(x), x @ (m.up.weight @ m.down.weight).T + m.up.bias, atol=1e-5)
    out = run_outputs(tiny_any, model, batches(tiny_any))
    assert out.shape == run_outputs(tiny_any, tiny_any.model, batches(tiny_any)).shape
    assert torch.isfinite(out).all()


def test_low_rank_is_the_truncated_svd(tiny_bert) -> None:
    u = tiny_bert.units[5]
    model = apply_plan(tiny_bert, CompressionPlan({u.name: UnitSpec(rank=6)}))
    m = get_module(model, u.name)
    W = get_module(tiny_bert.model, u.name).weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :6] * S[:6]) @ Vh[:6]
    assert torch.allclose((m.up.weight @ m.down.weight).double(), best, atol=1e-5)


def test_rank_above_min_dim_is_clamped_and_nearly_exact(tiny_bert) -> None:
    u = next(u for u in tiny_bert.units if u.role == "ffn_in")  # (64, 32)
    model = apply_plan(tiny_bert, CompressionPlan({u.name: UnitSpec(rank=1000)}))
    m = get_module(model, u.name)
    assert isinstance(m, LowRankLinear) and m.rank == 32
    W = get_module(tiny_bert.model, u.name).weight.detach()
    assert torch.allclose(m.up.weight @ m.down.weight, W, atol=1e-5)


def test_embedding_rank_gives_factorized_embedding(tiny_hf, minilm_tokenizer) -> None:
    emb = next(u for u in tiny_hf.units if u.role == "embedding")
    model = apply_plan(tiny_hf, CompressionPlan({emb.name: UnitSpec(rank=8)}))
    m = get_module(model, emb.name)
    assert isinstance(m, FactorizedEmbedding)
    vocab, dim = emb.shape
    assert m.table.weight.shape == (vocab, 8) and m.proj.weight.shape == (dim, 8)
    assert model.get_input_embeddings() is m
    full = m.table.weight @ m.proj.weight.T
    assert int(torch.linalg.matrix_rank(full[:2000])) <= 8
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert torch.allclose(m(ids), full[ids], atol=1e-6)
    enc = minilm_tokenizer(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert out.shape == (1, enc["input_ids"].shape[1], dim) and torch.isfinite(out).all()


# -- sparsity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity, bits", [(0.3, 32), (0.5, 4), (0.9, 8)])
def test_unstructured_sparsity_zeroes_at_least_round_s_numel(tiny_any, sparsity, bits) -> None:
    spec = UnitSpec(sparsity=sparsity, bits=bits, group_size=8 if bits == 4 else None)
    model = apply_plan(tiny_any, _all_units(tiny_any, spec))
    stored = _stored(model)
    assert len(stored) == len(tiny_any.units)
    for name, m in stored:
        w = m.weight.detach()
        assert int((w == 0).sum()) >= round(sparsity * w.numel()), name
        if m.mask is not None:  # bitmask layout (dense when a mask would not save bytes)
            assert m.fmt.sparse == "bitmask"
            assert int((~m.mask).sum()) == round(sparsity * w.numel())
            assert bool((w[~m.mask] == 0).all())
        orig = get_module(tiny_any.model, name).weight.detach()
        kept = w != 0
        if bits == 32:  # the largest weights are the ones kept, unchanged
            assert torch.equal(w[kept], orig[kept])
            assert float(orig[~kept].abs().max()) <= float(orig[kept].abs().min())


def test_sparsity_on_low_rank_factors(tiny_bert) -> None:
    model = apply_plan(tiny_bert, _all_units(tiny_bert, UnitSpec(rank=8, sparsity=0.5), roles=("ffn_in",)))
    for u in tiny_bert.units:
        if u.role != "ffn_in":
            continue
        m = get_module(model, u.name)
        for f in (m.down, m.up):
            assert int((f.weight == 0).sum()) >= round(0.5 * f.weight.numel())


@pytest.mark.parametrize("bits", [32, 4])
def test_2_4_holds_in_every_group_of_every_stored_matrix(tiny_any, bits) -> None:
    spec = UnitSpec(sparsity=0.5, pattern="2:4", bits=bits, group_size=16 if bits == 4 else None)
    model = apply_plan(tiny_any, _all_units(tiny_any, spec))
    # low-rank factors too: rank 8 keeps the factors' inner dimension divisible by 4
    lr = apply_plan(tiny_any, _all_units(tiny_any, UnitSpec(rank=8, sparsity=0.5, pattern="2:4"),
                                         roles=("ffn_in", "ffn_out")))
    stored = _stored(model) + [(n, m) for n, m in _stored(lr)]
    assert len(stored) >= len(tiny_any.units)
    for name, m in stored:
        w = m.weight.detach()
        rows, cols = w.shape
        groups = (w != 0).reshape(rows, cols // 4, 4).sum(-1)
        assert int(groups.max()) <= 2, name
        assert m.fmt.sparse == "2:4"
        assert bool((m.mask.reshape(rows, cols // 4, 4).sum(-1) == 2).all())


# -- quantisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [8, 24])
def test_int4_per_group_codes_and_levels(tiny_any, group_size) -> None:
    model = apply_plan(tiny_any, _all_units(tiny_any, UnitSpec(bits=4, group_size=group_size)))
    stored = _stored(model)
    assert len(stored) == len(tiny_any.units)
    for name, m in stored:
        w, codes, scales = m.weight.detach(), m.codes, m.scales
        rows, cols = w.shape
        n_groups = -(-cols // group_size)
        assert codes.dtype == torch.int8 and codes.shape == w.shape
        assert int(codes.min()) >= -7 and int(codes.max()) <= 7
        assert scales.shape == (rows, n_groups) and scales.dtype == torch.float32
        expanded = scales.repeat_interleave(group_size, dim=1)[:, :cols]
        assert torch.equal(w, codes.float() * expanded), name
        for g in range(n_groups):
            block = w[:, g * group_size:(g + 1) * group_size]
            cblock = codes[:, g * group_size:(g + 1) * group_size]
            for r in range(0, rows, max(1, rows // 7)):  # a spread of rows keeps this fast
                assert torch.unique(cblock[r]).numel() <= 16
                assert torch.unique(block[r]).numel() <= 16


def test_int8_per_channel_codes_and_scales(tiny_any) -> None:
    model = apply_plan(tiny_any, _all_units(tiny_any, UnitSpec(bits=8)))
    for name, m in _stored(model):
        w = m.weight.detach()
        assert m.fmt.bits == 8 and m.fmt.group_size is None
        assert int(m.codes.min()) >= -127 and int(m.codes.max()) <= 127
        assert m.scales.shape == (w.shape[0], 1)
        assert torch.equal(w, m.codes.float() * m.scales), name
        orig = get_module(tiny_any.model, name).weight.detach()
        assert float((w - orig).abs().max()) <= float(orig.abs().max()) / 127 + 1e-6


def test_group_size_is_ignored_at_16_and_32_bits(tiny_bert) -> None:
    model = apply_plan(tiny_bert, _all_units(tiny_bert, UnitSpec(bits=16, group_size=8)))
    assert all(m.fmt.group_size is None and m.codes is None for _, m in _stored(model))


# -- sharing -----------------------------------------------------------------------------------------
def _scope_units(adapter, layer: int, scope: str) -> tuple[list[str], list[str]]:
    """(units of `layer` inside the scope, units of `layer` outside it)."""
    attn = ("query", "key", "value", "qkv", "attn_out")
    inside = [u.name for u in adapter.units if u.layer == layer and
              (scope == "block" or (u.role in attn) == (scope == "attention"))]
    outside = [u.name for u in adapter.units if u.layer == layer and u.name not in inside]
    return inside, outside


@pytest.mark.parametrize("scope", ["attention", "ffn", "block"])
@pytest.mark.parametrize("bits", [32, 4])
def test_shared_layers_share_storage(tiny_any, batches, run_outputs, scope, bits) -> None:
    a = tiny_any
    l0, l1 = a.layers[0], a.layers[1]
    plan = CompressionPlan(sharing=SharingSpec(groups=((0, 1),), scope=scope))
    if bits != 32:
        plan = plan.with_units(**{u.name: UnitSpec(bits=bits, group_size=8) for u in a.units if u.layer == 0})
    model = apply_plan(a, plan)
    inside, outside = _scope_units(a, 0, scope)
    assert inside
    for name in inside:
        m0, m1 = get_module(model, name), get_module(model, layer_path_swap(name, l0, l1))
        assert m1 is m0
        assert m1.weight.data_ptr() == m0.weight.data_ptr()
        if bits != 32:
            assert isinstance(m0, SlimLinear) and m0.fmt.bits == bits
    for name in outside:
        m0, m1 = get_module(model, name), get_module(model, layer_path_swap(name, l0, l1))
        assert m1 is not m0 and m1.weight.data_ptr() != m0.weight.data_ptr()
        assert torch.equal(m1.weight, get_module(a.model, layer_path_swap(name, l0, l1)).weight)
    packed = pack_model(model)
    l1_scope = [layer_path_swap(p, l0, l1) for p in
                ((l0.path,) if scope == "block" else l0.attention_scope if scope == "attention" else l0.ffn_scope)]
    assert not [k for k in packed if any(k.startswith(p + ".") for p in l1_scope)]
    for name in inside:
        assert sum(k.startswith(name + ".") for k in packed) >= 1
    ptrs = [t.data_ptr() for t in packed.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs)), "a tensor was packed twice"
    out = run_outputs(a, model, batches(a))
    assert torch.isfinite(out).all()


def test_sharing_uses_the_representatives_spec(tiny_bert) -> None:
    a = tiny_bert
    l0, l1 = a.layers[0], a.layers[1]
    q0 = l0.qkv_units[0]
    q1 = layer_path_swap(q0, l0, l1)
    plan = CompressionPlan({q0: UnitSpec(bits=8), q1: UnitSpec(rank=2)},
                           sharing=SharingSpec(groups=((0, 1),), scope="attention"))
    canon = canonical_plan(a, plan)
    assert canon.units[q1] == canon.units[q0] == UnitSpec(bits=8)
    model = apply_plan(a, plan)
    assert get_module(model, q1) is get_module(model, q0)
    assert isinstance(get_module(model, q0), SlimLinear)


def test_shared_heads_and_neurons_follow_the_representative(tiny_bert, batches, run_outputs) -> None:
    a = tiny_bert
    plan = CompressionPlan(layers={0: LayerSpec(2, 16)}, sharing=SharingSpec(groups=((0, 1),), scope="block"))
    assert canonical_plan(a, plan).layers == {0: LayerSpec(2, 16), 1: LayerSpec(2, 16)}
    model = apply_plan(a, plan)
    assert model.encoder.layer[1] is model.encoder.layer[0]
    assert get_module(model, a.layers[0].qkv_units[0]).weight.shape == (16, 32)
    assert run_outputs(a, model, batches(a)).shape == (16, 32)


def test_canonical_plan_rejects_what_the_model_lacks(tiny_bert) -> None:
    with pytest.raises(PlanError, match=r"lacks: \['encoder.layer.9.attention.self.query'\]"):
        canonical_plan(tiny_bert, CompressionPlan({"encoder.layer.9.attention.self.query": UnitSpec(bits=8)}))
    with pytest.raises(PlanError, match="heads_kept 5 > 4 heads"):
        canonical_plan(tiny_bert, CompressionPlan(layers={0: LayerSpec(heads_kept=5)}))
    with pytest.raises(PlanError, match="neurons_kept 65 > 64 neurons"):
        canonical_plan(tiny_bert, CompressionPlan(layers={0: LayerSpec(neurons_kept=65)}))
    with pytest.raises(PlanError, match="layer spec for layer 7"):
        canonical_plan(tiny_bert, CompressionPlan(layers={7: LayerSpec(heads_kept=1)}))
    with pytest.raises(PlanError, match=r"names layer\(s\) \[4\]"):
        canonical_plan(tiny_bert, CompressionPlan(sharing=SharingSpec(groups=((0, 4),))))


# -- structured pruning ------------------------------------------------------------------------------
def _zeroed_reference(adapter, heads: dict[int, int], neurons: dict[int, int]) -> nn.Module:
    """The reference model with the dropped heads' / neurons' output columns zeroed: the same function
    as removing them, so a pruned model must match it."""
    model = adapter.fresh_model()
    with torch.no_grad():
        for i, k in heads.items():
            info = adapter.layers[i]
            q = [get_module(model, n).weight for n in info.qkv_units]
            o = get_module(model, info.attn_out_unit).weight
            keep = ops.top_k_sorted(ops.head_importance(q if len(q) > 1 else q[0], o, info.num_heads,
                                                        fused_qkv=len(q) == 1), k)
            for h in range(info.num_heads):
                if h not in keep:
                    o[:, h * info.head_dim:(h + 1) * info.head_dim] = 0
        for i, k in neurons.items():
            info = adapter.layers[i]
            w_in = get_module(model, info.ffn_in_unit).weight
            w_out = get_module(model, info.ffn_out_unit).weight
            keep = ops.top_k_sorted(ops.neuron_importance(w_in, w_out), k)
            drop = torch.ones(info.intermediate, dtype=torch.bool)
            drop[keep] = False
            w_out[:, drop] = 0
    return model


def test_head_and_neuron_pruning_shapes_and_function(tiny_any, batches, run_outputs) -> None:
    a = tiny_any
    data = batches(a)
    ref = run_outputs(a, a.model, data)
    inter1 = a.layers[1].intermediate
    plan = CompressionPlan(layers={0: LayerSpec(heads_kept=2), 1: LayerSpec(heads_kept=1, neurons_kept=inter1 // 4)})
    model = apply_plan(a, plan)
    for i, heads in ((0, 2), (1, 1)):
        info = a.layers[i]
        hidden = get_module(a.model, info.attn_out_unit).out_features
        dim = heads * info.head_dim
        if len(info.qkv_units) == 1:
            assert get_module(model, info.qkv_units[0]).weight.shape == (3 * dim, hidden)
            assert get_module(model, info.qkv_units[0]).bias.shape == (3 * dim,)
        else:
            for n in info.qkv_units:
                assert get_module(model, n).weight.shape == (dim, hidden)
        assert get_module(model, info.attn_out_unit).weight.shape == (hidden, dim)
        assert getattr(get_module(model, info.attention_path), info.heads_attr) == heads
    n1 = a.layers[1]
    assert get_module(model, n1.ffn_in_unit).weight.shape[0] == inter1 // 4
    assert get_module(model, n1.ffn_out_unit).weight.shape[1] == inter1 // 4
    assert get_module(model, a.layers[0].ffn_in_unit).weight.shape[0] == a.layers[0].intermediate
    out = run_outputs(a, model, data)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    expected = run_outputs(a, _zeroed_reference(a, {0: 2, 1: 1}, {1: inter1 // 4}), data)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, ref, atol=1e-5)


def test_pruning_then_compression_composes(tiny_any, batches, run_outputs) -> None:
    a = tiny_any
    info = a.layers[0]
    spec = UnitSpec(rank=4, sparsity=0.5, bits=4, group_size=8)
    plan = CompressionPlan({n: spec for n in (*info.qkv_units, info.attn_out_unit, info.ffn_out_unit)},
                           layers={0: LayerSpec(heads_kept=3, neurons_kept=20)})
    model = apply_plan(a, plan)
    o = get_module(model, info.attn_out_unit)
    assert isinstance(o, LowRankLinear) and o.down.weight.shape == (4, 3 * info.head_dim)
    f = get_module(model, info.ffn_out_unit)
    assert f.down.weight.shape == (4, 20)
    assert torch.isfinite(run_outputs(a, model, batches(a))).all()


# -- determinism and the cache -----------------------------------------------------------------------
def _mixed_plan(adapter) -> CompressionPlan:
    units = {}
    for i, u in enumerate(adapter.units):
        if u.role == "embedding":
            units[u.name] = UnitSpec(rank=16, bits=8)
        elif i % 4 == 0:
            units[u.name] = UnitSpec(rank=6, bits=4, group_size=8)
        elif i % 4 == 1:
            units[u.name] = UnitSpec(sparsity=0.5, pattern="2:4", bits=8)
        elif i % 4 == 2:
            units[u.name] = UnitSpec(sparsity=0.3, bits=16)
    return CompressionPlan(units, layers={0: LayerSpec(3, 40)},
                           sharing=SharingSpec(groups=((1, 2),) if len(adapter.layers) > 2 else (), scope="ffn"))


def test_apply_twice_gives_identical_tensors(tiny_any) -> None:
    plan = _mixed_plan(tiny_any)
    s1 = apply_plan(tiny_any, plan).state_dict()
    s2 = apply_plan(tiny_any, plan).state_dict()
    assert s1.keys() == s2.keys()
    assert any(k.endswith(".codes") for k in s1) and any(k.endswith(".mask") for k in s1)
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k


def _cache_hits(cache: DecompositionCache) -> int:
    """SVD hits plus, where the cache also keeps finished modules, their hits."""
    return cache.hits + getattr(cache, "unit_hits", 0)


def test_decomposition_cache_hits_on_second_apply(tiny_bert) -> None:
    roles = ("query", "ffn_in", "embedding")
    plan = _all_units(tiny_bert, UnitSpec(rank=4), roles=roles)
    n_lowrank = len(plan.units)
    cache = DecompositionCache()
    m1 = apply_plan(tiny_bert, plan, cache=cache)
    assert (_cache_hits(cache), cache.misses, len(cache)) == (0, n_lowrank, n_lowrank)
    m2 = apply_plan(tiny_bert, plan, cache=cache)
    assert (_cache_hits(cache), cache.misses) == (n_lowrank, n_lowrank)
    # another rank reuses the same decompositions
    hits = cache.hits
    m3 = apply_plan(tiny_bert, _all_units(tiny_bert, UnitSpec(rank=2), roles=roles), cache=cache)
    assert (cache.hits, cache.misses) == (hits + n_lowrank, n_lowrank)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    fresh = apply_plan(tiny_bert, _all_units(tiny_bert, UnitSpec(rank=2), roles=roles)).state_dict()
    s3 = m3.state_dict()
    assert s3.keys() == fresh.keys() and all(torch.equal(s3[k], fresh[k]) for k in s3)


def test_cached_results_are_isolated_from_returned_models(tiny_bert) -> None:
    plan = _mixed_plan(tiny_bert)
    cache = DecompositionCache()
    m1 = apply_plan(tiny_bert, plan, cache=cache)
    with torch.no_grad():
        for t in [*m1.parameters(), *m1.buffers()]:
            if t.is_floating_point():
                t.fill_(7.0)
    s2 = apply_plan(tiny_bert, plan, cache=cache).state_dict()
    ref = apply_plan(tiny_bert, plan).state_dict()
    assert s2.keys() == ref.keys() and all(torch.equal(s2[k], ref[k]) for k in ref)


def test_decomposition_cache_keys_on_activation_scale(tiny_bert, batches) -> None:
    scales = collect_activation_scales(tiny_bert, batches(tiny_bert))
    plan = _all_units(tiny_bert, UnitSpec(rank=4), roles=("ffn_in",))
    cache = DecompositionCache()
    apply_plan(tiny_bert, plan, cache=cache)
    apply_plan(tiny_bert, plan, cache=cache, act_scales=scales)
    assert (cache.hits, cache.misses) == (0, 2 * len(plan.units))
    apply_plan(tiny_bert, plan, cache=cache, act_scales=scales)
    assert _cache_hits(cache) == len(plan.units) and cache.misses == 2 * len(plan.units)


# -- calibration -------------------------------------------------------------------------------------
def test_activation_scales_cover_linear_units_and_ignore_padding(tiny_any, batches) -> None:
    a = tiny_any
    one = collect_activation_scales(a, batches(a, n=8, batch_size=1))
    many = collect_activation_scales(a, batches(a, n=8, batch_size=8))
    assert set(one) == {u.name for u in a.units if u.kind == "linear"}
    for u in _linear_units(a):
        s = one[u.name]
        assert s.shape == (u.shape[1],) and s.dtype == torch.float32
        assert bool((s > 0).all()) and abs(float(s.mean()) - 1.0) < 1e-4
        # padding added by batching must not change the statistics
        assert torch.allclose(one[u.name], many[u.name], rtol=1e-4, atol=1e-5), u.name


def test_activation_scales_follow_pruned_columns(tiny_bert, batches, run_outputs) -> None:
    a = tiny_bert
    scales = collect_activation_scales(a, batches(a))
    info = a.layers[0]
    plan = CompressionPlan({info.ffn_out_unit: UnitSpec(rank=4)}, layers={0: LayerSpec(neurons_kept=20)})
    model = apply_plan(a, plan, act_scales=scales)
    m = get_module(model, info.ffn_out_unit)
    assert m.down.weight.shape == (4, 20)
    assert torch.isfinite(run_outputs(a, model, batches(a))).all()


# -- real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_data_aware_low_rank_beats_plain_svd_on_minilm_ffn(minilm, texts) -> None:
    data = minilm.make_batches(sorted(texts, key=len), 16)  # length-sorted batches: little padding
    assert sum(int(b.inputs["input_ids"].shape[0]) for b in data) == 64
    scales = collect_activation_scales(minilm, data)
    with torch.no_grad():
        ref = torch.cat([minilm.output(minilm.model, b) for b in data])

    def fidelity(model: nn.Module) -> float:
        with torch.no_grad():
            out = torch.cat([minilm.output(model, b) for b in data])
        return float(F.cosine_similarity(out, ref).mean())

    cache = DecompositionCache()
    results = {}
    for rank in (128,):
        plan = _all_units(minilm, UnitSpec(rank=rank), roles=("ffn_in", "ffn_out"))
        assert len(plan.units) == 12
        results[rank] = (fidelity(apply_plan(minilm, plan, cache=cache)),
                         fidelity(apply_plan(minilm, plan, cache=cache, act_scales=scales)))
    for rank, (plain, aware) in results.items():
        assert aware > plain, f"rank {rank}: data-aware {aware:.4f} <= plain SVD {plain:.4f} ({results})"


@pytest.mark.slow
def test_real_minilm_head_pruning_keeps_embedding_shape(minilm, texts) -> None:
    data = minilm.make_batches(texts[:8], 8)
    model = apply_plan(minilm, CompressionPlan(layers={i: LayerSpec(heads_kept=6, neurons_kept=768)
                                                       for i in range(6)}))
    info = minilm.layers[0]
    assert get_module(model, info.qkv_units[0]).weight.shape == (192, 384)
    assert get_module(model, info.ffn_in_unit).weight.shape == (768, 384)
    with torch.no_grad():
        out = minilm.output(model, data[0])
    assert out.shape == (8, 384) and torch.isfinite(out).all()


def test_adapters_are_the_expected_types(tiny_bert, tiny_vit) -> None:
    assert isinstance(tiny_bert, HFEncoderAdapter) and tiny_bert.kind == "encoder"
    assert isinstance(tiny_vit, TimmViTAdapter) and tiny_vit.kind == "classifier"
