"""Data-driven structured pruning: importance from calibration moments, the least-squares re-fit of the
following projection, plan/recipe/space plumbing, caching, memory and composition with later transforms."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from slimformer.compression import ops
from slimformer.compression import structure as st
from slimformer.compression.apply import DecompositionCache, apply_plan, get_module
from slimformer.compression.calibration import collect_hessians, collect_structure_stats, structure_units
from slimformer.compression.memory import plan_memory
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, StructureSpec, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import pack_model, packed_bytes
from slimformer.errors import PlanError, RecipeError
from slimformer.search.rundir import _identity
from slimformer.spaces.config import SpaceConfig
from slimformer.spaces.space import SearchSpace

DATA = StructureSpec("activation", refit=True)


def _io(adapter, model: nn.Module, path: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output rows of the module at `path` over all real (non-padding) tokens of `batches`."""
    xs, ys, mask = [], [], {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x, y = args[0], out
        m = mask.get("m")
        if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
            x, y = x[m.bool()], y[m.bool()]
        xs.append(x.reshape(-1, x.shape[-1]))
        ys.append(y.reshape(-1, y.shape[-1]))

    h = get_module(model, path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                mask["m"] = b.inputs.get("attention_mask")
                adapter.output(model, b)
    finally:
        h.remove()
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("what", ["neurons", "heads"])
def test_refit_reduces_the_layer_output_error_on_calibration_data(tiny_any, batches, what) -> None:
    a = tiny_any
    cal = batches(a, n=16)
    stats = collect_structure_stats(a, cal)
    info = a.layers[0]
    layer = LayerSpec(neurons_kept=info.intermediate // 2) if what == "neurons" else \
        LayerSpec(heads_kept=info.num_heads // 2)
    unit = info.ffn_out_unit if what == "neurons" else info.attn_out_unit
    _, ref = _io(a, a.model, unit, cal)
    errors = {}
    for refit in (False, True):
        model = apply_plan(a, CompressionPlan(layers={0: layer}, structure=StructureSpec("activation", refit)),
                           structure_stats=stats)
        x, y = _io(a, model, unit, cal)
        assert x.shape[1] == (layer.neurons_kept or layer.heads_kept * info.head_dim)  # type: ignore[operator]
        errors[refit] = float((y - ref).square().sum())
    assert errors[True] < errors[False], errors
    assert errors[True] < 0.9 * errors[False], errors  # not a rounding-level improvement


def test_refit_projection_is_the_ridge_least_squares_solution() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=g) @ torch.randn(12, 12, generator=g) + 0.5
    w, b = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mom = st.InputMoments(x.mean(0), x.T @ x / x.shape[0], x.shape[0])
    w2, b2 = st.refit_projection(w, b, keep, mom, damp=0.0)
    full = x @ w.T + b
    ls = torch.linalg.lstsq(torch.cat([x[:, keep], torch.ones(len(x), 1)], 1).double(), full.double()).solution
    assert torch.allclose(w2, ls[:-1].T.float(), atol=1e-3) and torch.allclose(b2, ls[-1].float(), atol=1e-3)
    heavy, _ = st.refit_projection(w, b, keep, mom, damp=1e6)  # infinite ridge: back to the kept columns
    assert torch.allclose(heavy, w[:, keep], atol=1e-3)


def test_importance_is_the_expected_squared_contribution(tiny_bert, batches) -> None:
    a = tiny_bert
    cal = batches(a)
    stats = collect_structure_stats(a, cal)
    assert set(stats.moments) == set(structure_units(a))
    info = a.layers[0]
    x, _ = _io(a, a.model, info.ffn_out_unit, cal)
    w = get_module(a.model, info.ffn_out_unit).weight.detach()
    direct = w.square().sum(0) * x.square().mean(0)
    assert torch.allclose(st.neuron_scores(w, stats.moments[info.ffn_out_unit], centered=False), direct, rtol=1e-3)
    xo, _ = _io(a, a.model, info.attn_out_unit, cal)
    wo = get_module(a.model, info.attn_out_unit).weight.detach()
    hd = info.head_dim
    per_head = torch.stack([(xo[:, h * hd:(h + 1) * hd] @ wo[:, h * hd:(h + 1) * hd].T).square().sum(1).mean()
                            for h in range(info.num_heads)])
    got = st.head_scores(wo, stats.moments[info.attn_out_unit], info.num_heads, centered=False)
    assert torch.allclose(got, per_head, rtol=1e-3)


def test_ranking_is_deterministic_and_counts_match_the_plan(tiny_any, batches) -> None:
    a = tiny_any
    cal = batches(a)
    s1, s2 = collect_structure_stats(a, cal), collect_structure_stats(a, cal)
    assert s1.fingerprint == s2.fingerprint
    info = a.layers[0]
    w = get_module(a.model, info.ffn_out_unit).weight
    k1 = ops.top_k_sorted(st.neuron_scores(w, s1.moments[info.ffn_out_unit], True), 10)
    k2 = ops.top_k_sorted(st.neuron_scores(w, s2.moments[info.ffn_out_unit], True), 10)
    assert torch.equal(k1, k2)
    n = len(a.layers)
    plan = CompressionPlan(layers={i: LayerSpec(heads_kept=max(1, a.layers[i].num_heads - 1 - i % 2),
                                                neurons_kept=a.layers[i].intermediate // 3) for i in range(n)},
                           structure=DATA)
    m1, m2 = apply_plan(a, plan, structure_stats=s1), apply_plan(a, plan, structure_stats=s2)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    for i, ls in plan.layers.items():
        li = a.layers[i]
        assert getattr(get_module(m1, li.attention_path), li.heads_attr) == ls.heads_kept
        assert get_module(m1, li.attn_out_unit).weight.shape[1] == ls.heads_kept * li.head_dim  # type: ignore[operator]
        assert get_module(m1, li.ffn_in_unit).weight.shape[0] == ls.neurons_kept
        assert get_module(m1, li.ffn_out_unit).weight.shape[1] == ls.neurons_kept


def test_data_importance_picks_other_units_than_weight_norms(tiny_bert, batches) -> None:
    a = tiny_bert
    stats = collect_structure_stats(a, batches(a))
    info = a.layers[0]
    out = get_module(a.model, info.ffn_out_unit).weight
    by_weight = ops.top_k_sorted(ops.neuron_importance(get_module(a.model, info.ffn_in_unit).weight, out), 16)
    by_data = ops.top_k_sorted(st.neuron_scores(out, stats.moments[info.ffn_out_unit], True), 16)
    assert not torch.equal(by_weight, by_data)


def test_identity_plans_are_unchanged(tiny_any, batches, run_outputs) -> None:
    a = tiny_any
    data = batches(a)
    stats = collect_structure_stats(a, data)
    ref = run_outputs(a, a.model, data)
    full = {i: LayerSpec(heads_kept=li.num_heads, neurons_kept=li.intermediate) for i, li in enumerate(a.layers)}
    for plan in (CompressionPlan(structure=DATA), CompressionPlan(layers=full, structure=DATA)):
        assert torch.equal(run_outputs(a, apply_plan(a, plan, structure_stats=stats), data), ref)
    assert apply_plan(a, CompressionPlan(structure=DATA)) is not None  # nothing pruned: no data needed


def test_data_plans_need_calibration_data_unless_values_are_overwritten(tiny_bert) -> None:
    plan = CompressionPlan(layers={0: LayerSpec(neurons_kept=8)}, structure=DATA)
    with pytest.raises(PlanError, match="needs calibration data .*importance weight, refit false"):
        apply_plan(tiny_bert, plan)
    model = apply_plan(tiny_bert, plan, rtn_fallback=True)  # loading a saved model: shapes only
    assert get_module(model, tiny_bert.layers[0].ffn_out_unit).weight.shape[1] == 8
    with pytest.raises(PlanError, match="importance must be 'weight' or 'activation'"):
        StructureSpec("fisher")  # type: ignore[arg-type]


def test_refit_is_cached_and_memory_is_unchanged(tiny_bert, batches) -> None:
    a = tiny_bert
    cal = batches(a)
    stats, hessians = collect_structure_stats(a, cal), collect_hessians(a, cal)
    n = len(a.layers)
    units = {u.name: UnitSpec(bits=4, group_size=16, method="gptq") for u in a.units if u.kind == "linear"}
    units[a.layers[0].ffn_out_unit] = UnitSpec(rank=8, sparsity=0.5, pattern="2:4", bits=8, method="gptq")
    layers = {i: LayerSpec(heads_kept=2, neurons_kept=24) for i in range(n)}
    for structure in (StructureSpec(), DATA, StructureSpec("weight", refit=True)):
        plan = CompressionPlan(units, layers, structure=structure)
        cache = DecompositionCache()
        model = apply_plan(a, plan, cache, hessians=hessians, structure_stats=stats)
        assert plan_memory(a, plan).total_bytes == packed_bytes(pack_model(model))
        again = apply_plan(a, plan, cache, hessians=hessians, structure_stats=stats)
        assert cache.unit_hits == len(units)
        assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))
        assert len(cache._refits) == (2 * n if structure.refit else 0)


def test_structure_modes_do_not_share_cached_units(tiny_bert, batches, run_outputs) -> None:
    a = tiny_bert
    data = batches(a)
    stats = collect_structure_stats(a, data)
    units = {u.name: UnitSpec(bits=8) for u in a.units if u.kind == "linear"}
    cache = DecompositionCache()
    outs = [run_outputs(a, apply_plan(a, CompressionPlan(units, {0: LayerSpec(2, 24)}, structure=s), cache,
                                      structure_stats=stats), data)
            for s in (StructureSpec(), DATA)]
    fresh = run_outputs(a, apply_plan(a, CompressionPlan(units, {0: LayerSpec(2, 24)}, structure=DATA),
                                      structure_stats=stats), data)
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[1], fresh)


def test_shared_layers_use_the_representatives_kept_set_and_refit(tiny_bert, batches, run_outputs) -> None:
    a = tiny_bert
    data = batches(a)
    stats = collect_structure_stats(a, data)
    plan = CompressionPlan(layers={0: LayerSpec(heads_kept=2, neurons_kept=20)},
                           sharing=SharingSpec(((0, 1),), "block"), structure=DATA)
    model = apply_plan(a, plan, structure_stats=stats)
    l0, l1 = a.layers[0], a.layers[1]
    assert get_module(model, l1.attn_out_unit) is get_module(model, l0.attn_out_unit)
    assert get_module(model, l1.ffn_out_unit).weight.shape[1] == 20
    assert torch.isfinite(run_outputs(a, model, data)).all()
    assert plan_memory(a, plan).total_bytes == packed_bytes(pack_model(model))


def test_recipes_round_trip_the_structure_field(tiny_bert) -> None:
    plan = CompressionPlan({tiny_bert.units[0].name: UnitSpec(bits=8)}, {0: LayerSpec(2, 24)}, structure=DATA)
    rec = Recipe.from_plan(plan, tiny_bert)
    text = rec.to_yaml()
    assert yaml.safe_load(text)["structure"] == {"importance": "activation", "refit": True}
    back = Recipe.from_yaml(text)
    assert back == rec and back.to_plan(tiny_bert).structure == DATA
    old = Recipe.from_plan(CompressionPlan(layers={0: LayerSpec(2, 24)}), tiny_bert)
    assert "structure" not in yaml.safe_load(old.to_yaml())  # old recipes read and write as before
    assert Recipe.from_yaml(old.to_yaml()).to_plan(tiny_bert).structure == StructureSpec()
    unpruned = Recipe.from_plan(CompressionPlan({tiny_bert.units[0].name: UnitSpec(bits=8)}, structure=DATA),
                                tiny_bert)
    assert unpruned.structure is None  # means nothing without pruning: canonical plans drop it
    with pytest.raises(RecipeError, match="structure.importance"):
        Recipe.from_yaml(text.replace("importance: activation", "importance: fisher"))


def test_space_stamps_its_structure_setting_and_resume_compares_it(tiny_bert) -> None:
    groups = [{"select": {"role": ["ffn_in", "ffn_out"]}, "neurons_kept": [0.5, 1.0]}]
    space = SearchSpace(tiny_bert, SpaceConfig.model_validate({"groups": groups}))
    assert space.plan_from_params({}).structure == DATA  # the search default: calibration data exists
    off = SpaceConfig.model_validate({"groups": groups, "structure": {"importance": "weight", "refit": False}})
    assert SearchSpace(tiny_bert, off).plan_from_params({}).structure == StructureSpec()
    new = {"space": SpaceConfig.model_validate({"groups": groups}).model_dump(mode="json")}
    old = {"space": {k: v for k, v in new["space"].items() if k != "structure"}}
    assert _identity(old, "space") != _identity(new, "space")  # an old pruning run pruned by weight norms
    plain = [{"bits": [4, 8]}]
    new = {"space": SpaceConfig.model_validate({"groups": plain}).model_dump(mode="json")}
    old = {"space": {k: v for k, v in new["space"].items() if k != "structure"}}
    assert _identity(old, "space") == _identity(new, "space")  # no pruning: old run dirs still resume


@pytest.mark.slow
def test_real_minilm_data_refit_beats_weight_norms(minilm, texts) -> None:
    from slimformer.data import text_splits
    from slimformer.evaluators.quality import FidelityEvaluator

    search, held = text_splits(64, 64)
    stats = collect_structure_stats(minilm, minilm.make_batches(sorted(search, key=len), 32))
    ev = FidelityEvaluator(minilm, minilm.make_batches(sorted(held, key=len), 32))
    layers = {i: LayerSpec(neurons_kept=768) for i in range(6)}
    cos = {s: ev.evaluate(apply_plan(minilm, CompressionPlan(layers=layers, structure=s),
                                     structure_stats=stats)).metrics["cosine"] for s in (StructureSpec(), DATA)}
    assert cos[DATA] > cos[StructureSpec()] + 0.1, cos


def test_saved_model_with_a_data_structure_loads_without_calibration_data(tiny_bert, batches, run_outputs,
                                                                          tmp_path) -> None:
    from slimformer.compression.saving import load_compressed, save_compressed

    a = tiny_bert
    data = batches(a)
    plan = CompressionPlan({u.name: UnitSpec(bits=8) for u in a.units if u.kind == "linear"},
                           {0: LayerSpec(2, 24), 1: LayerSpec(neurons_kept=40)}, structure=DATA)
    model = apply_plan(a, plan, structure_stats=collect_structure_stats(a, data))
    save_compressed(a, model, Recipe.from_plan(plan, a), tmp_path / "out")
    back = load_compressed(tmp_path / "out")
    assert back.recipe.structure is not None  # type: ignore[attr-defined]
    assert torch.equal(run_outputs(a, back.model, data), run_outputs(a, model, data))
