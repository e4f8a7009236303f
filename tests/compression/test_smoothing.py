"""Per-unit SmoothQuant of int8-kernel units (UnitSpec.smooth, compression/smoothing.py): validation, recipes (old
ones apply unchanged), factors from calibration data shared by query/key/value, saving, exact memory, the search
space default, and that smoothing lowers an int8 unit's error on inputs with an outlier channel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from slimformer.compression import ops
from slimformer.compression.apply import apply_plan
from slimformer.compression.calibration import collect_input_abs_max
from slimformer.compression.memory import plan_memory
from slimformer.compression.modules import LowRankLinear, SlimLinear
from slimformer.compression.plan import DEFAULT_SMOOTH, CompressionPlan, LayerSpec, SharingSpec, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, pack_model, packed_bytes, save_compressed
from slimformer.errors import PlanError, RecipeError
from slimformer.spaces.config import GroupConfig, SpaceConfig
from slimformer.spaces.space import SearchSpace

P0 = "encoder.layer.0."
QKV0 = tuple(P0 + f"attention.self.{r}" for r in ("query", "key", "value"))
FFN0, OUT0 = P0 + "intermediate.dense", P0 + "output.dense"


def _smoothed(alpha: float | None = 0.8) -> CompressionPlan:
    """q/k/v and FFN-in of layer 0 on the int8 kernel (smoothed with `alpha`), FFN-out low rank (rank 8), int8."""
    units = {n: UnitSpec(bits=8 if n.endswith("key") else 4, group_size=16, kernel="int8", smooth=alpha)
             for n in (*QKV0, FFN0)}
    units[OUT0] = UnitSpec(rank=8, bits=8, kernel="int8", smooth=alpha)
    return CompressionPlan(units=units)


def _outlier_bert(make_tiny):  # noqa: ANN202 - an adapter
    """The tiny BERT with one large input channel into every layer (embedding LayerNorm and layer-0 output
    LayerNorm scaled x25 on channel 3): the activation outlier SmoothQuant is for."""
    a = make_tiny("bert")
    with torch.no_grad():
        for ln in (a.model.embeddings.LayerNorm, a.model.encoder.layer[0].output.LayerNorm):
            ln.weight[3] *= 25.0
    return a


def test_smooth_validation() -> None:
    assert UnitSpec(bits=8, kernel="int8").smooth is None  # default: unsmoothed, as before
    assert UnitSpec(bits=4, kernel="int8", smooth=0.0).smooth == 0.0 and UnitSpec(bits=8, kernel="int8", smooth=1.0)
    with pytest.raises(PlanError, match=r"smooth \(SmoothQuant alpha\) must be in \[0, 1\] or null \(got 1.5\)"):
        UnitSpec(bits=8, kernel="int8", smooth=1.5)
    with pytest.raises(PlanError, match="must be in"):
        UnitSpec(bits=8, kernel="int8", smooth=float("nan"))
    with pytest.raises(PlanError, match="applies to kernel int8 units only .got smooth 0.5 with kernel exact"):
        UnitSpec(bits=8, smooth=0.5)
    assert 0.0 < DEFAULT_SMOOTH <= 1.0


def test_factors_come_from_calibration_and_query_key_value_share_them(tiny_bert, texts) -> None:
    cal = tiny_bert.make_batches(texts[:16], 8)
    act = collect_input_abs_max(tiny_bert, cal)
    model = apply_plan(tiny_bert, _smoothed(), act_max=act)
    q, k, v = (model.get_submodule(n) for n in QKV0)
    assert q.smooth is not None and torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, v.smooth)
    rows = torch.cat([q.weight, k.weight, v.weight]).detach()  # max |W| over all rows reading the input
    assert torch.equal(q.smooth, ops.smoothing_factors(act[QKV0[0]], rows, 0.8))
    ffn = model.get_submodule(FFN0)
    assert torch.equal(ffn.smooth, ops.smoothing_factors(act[FFN0], ffn.weight.detach(), 0.8))
    out = model.get_submodule(OUT0)
    assert isinstance(out, LowRankLinear) and out.down.smooth is not None
    assert torch.equal(out.up.smooth, torch.ones(8))  # no statistics for the intermediate: unit factors
    assert torch.exp(torch.log(ffn.smooth.double()).mean()).item() == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(2, 5, q.in_features)  # the forward runs the smoothed int8 kernel
    assert torch.equal(q(x), ops.int8_linear(x, q.weight, q.bias, q.smooth))
    # a different alpha on the key: query/value still share, the key has its own
    plan = _smoothed().with_units(**{QKV0[1]: UnitSpec(bits=8, group_size=16, kernel="int8", smooth=0.5)})
    m2 = apply_plan(tiny_bert, plan, act_max=act)
    q2, k2, v2 = (m2.get_submodule(n) for n in QKV0)
    assert torch.equal(q2.smooth, v2.smooth) and not torch.equal(q2.smooth, k2.smooth)


def test_smoothing_needs_calibration_data(tiny_bert) -> None:
    with pytest.raises(PlanError, match="needs calibration data"):
        apply_plan(tiny_bert, _smoothed())
    placeholder = apply_plan(tiny_bert, _smoothed(), rtn_fallback=True)  # loading: values come from the file
    assert torch.equal(placeholder.get_submodule(FFN0).smooth, torch.ones(32))


def test_pruned_and_shared_units_take_the_kept_columns(tiny_bert, texts) -> None:
    act = collect_input_abs_max(tiny_bert, tiny_bert.make_batches(texts[:8], 8))
    plan = CompressionPlan(units={n: UnitSpec(bits=8, kernel="int8", smooth=0.65) for n in (*QKV0, OUT0)},
                           layers={0: LayerSpec(neurons_kept=40)}, sharing=SharingSpec(((0, 1),), "attention"))
    model = apply_plan(tiny_bert, plan, act_max=act)
    out = model.get_submodule(OUT0)
    assert out.in_features == 40 and out.smooth.shape == (40,)
    assert model.get_submodule(QKV0[0]) is model.get_submodule("encoder.layer.1.attention.self.query")
    assert plan_memory(tiny_bert, plan).total_bytes == packed_bytes(pack_model(model))


def test_smoothing_lowers_the_int8_error_on_an_outlier_channel(make_tiny, texts) -> None:
    """Inputs with one large channel: per-tensor activation quantisation loses the others; the smoothed unit's
    outputs are closer to the exact linear's (measured on this model: 10x smaller relative squared error)."""
    a = _outlier_bert(make_tiny)
    cal, test = a.make_batches(texts[:32], 8), a.make_batches(texts[32:48], 8)
    act = collect_input_abs_max(a, cal)
    errs = {}
    for alpha in (None, 0.8):
        model = apply_plan(a, _smoothed(alpha), act_max=act)
        mods = [model.get_submodule(n) for n in (QKV0[0], FFN0)]
        seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda m, args, _o, seen=seen: seen.append((m, args[0]))) for m in mods]
        with torch.no_grad():
            for b in test:
                a.output(model, b)
        for h in hooks:
            h.remove()
        err = 0.0
        with torch.no_grad():
            for m, x in seen:
                exact = torch.nn.functional.linear(x, m.weight, m.bias)
                err += float((m(x) - exact).square().mean() / exact.square().mean())
        errs[alpha] = err
    assert errs[0.8] < 0.3 * errs[None], errs


def test_recipe_writes_smooth_only_when_set_and_old_recipes_apply_unchanged(tiny_bert, texts) -> None:
    plain = Recipe.from_plan(_smoothed(None), tiny_bert).to_yaml()
    assert "smooth" not in plain  # int8 units without smoothing: the recipe reads exactly as before
    text = Recipe.from_plan(_smoothed(), tiny_bert).to_yaml()
    rules = [r["spec"] for r in yaml.safe_load(text)["rules"]]
    assert all(r["smooth"] == 0.8 for r in rules) and yaml.safe_load(text)["slimformer_recipe"] == 1
    assert Recipe.from_yaml(text).to_plan(tiny_bert) == _smoothed()
    old = Recipe.from_yaml(plain).to_plan(tiny_bert)  # a recipe written before the field
    assert all(s.smooth is None for s in old.units.values())
    act = collect_input_abs_max(tiny_bert, tiny_bert.make_batches(texts[:8], 8))
    before = apply_plan(tiny_bert, old)  # needs no statistics; given them anyway, nothing changes
    after = apply_plan(tiny_bert, old, act_max=act)
    assert all(m.smooth is None for m in after.modules() if isinstance(m, SlimLinear))
    b = tiny_bert.make_batches(texts[:8], 8)[0]
    with torch.no_grad():
        assert torch.equal(tiny_bert.output(before, b), tiny_bert.output(after, b))


@pytest.mark.parametrize(("value", "needle"), [
    (1.5, "rules.0.spec.smooth"), ("on", "rules.0.spec.smooth"), (".nan", "rules.0.spec.smooth"),
])
def test_bad_smooth_in_a_recipe_is_one_line(tiny_bert, value, needle: str) -> None:
    doc = {"slimformer_recipe": 1, "model": {"id": "tiny"},
           "rules": [{"match": QKV0[0], "spec": {"bits": 8, "kernel": "int8", "smooth": value}}]}
    text = yaml.safe_dump(doc).replace("'.nan'", ".nan")
    with pytest.raises(RecipeError, match=needle) as err:
        Recipe.from_yaml(text).to_plan(tiny_bert)
    assert "\n" not in str(err.value)


def test_smooth_on_an_exact_kernel_rule_is_one_line(tiny_bert) -> None:
    doc = {"slimformer_recipe": 1, "model": {"id": "tiny"},
           "rules": [{"match": QKV0[0], "spec": {"bits": 8, "smooth": 0.8}}]}
    with pytest.raises(RecipeError, match="applies to kernel int8 units only") as err:
        Recipe.from_yaml(yaml.safe_dump(doc)).to_plan(tiny_bert)
    assert "\n" not in str(err.value)


def test_saving_keeps_the_factors_and_memory_is_exact(tiny_bert, texts, tmp_path: Path) -> None:
    act = collect_input_abs_max(tiny_bert, tiny_bert.make_batches(texts[:8], 8))
    plan = _smoothed()
    model = apply_plan(tiny_bert, plan, act_max=act)
    packed = pack_model(model)
    assert f"{FFN0}.smooth" in packed and f"{OUT0}.down.smooth" in packed and f"{OUT0}.up.smooth" in packed
    assert plan_memory(tiny_bert, plan).total_bytes == packed_bytes(packed)
    unsmoothed = plan_memory(tiny_bert, _smoothed(None)).total_bytes
    assert plan_memory(tiny_bert, plan).total_bytes - unsmoothed == 4 * (3 * 32 + 32 + 64 + 8)  # q k v, FFN, down, up
    out = save_compressed(tiny_bert, model, Recipe.from_plan(plan, tiny_bert), tmp_path / "c")
    loaded = load_compressed(out).model
    for n in (*QKV0, FFN0):
        assert torch.equal(loaded.get_submodule(n).smooth, model.get_submodule(n).smooth)
    b = tiny_bert.make_batches(texts[:8], 8)[0]
    with torch.no_grad():
        assert torch.equal(tiny_bert.output(loaded, b), tiny_bert.output(model, b))


def test_space_smooths_int8_units_by_default(tiny_bert) -> None:
    assert GroupConfig().smooth == DEFAULT_SMOOTH
    cfg = SpaceConfig(groups=[GroupConfig(bits=[8, 4], kernel=["exact", "int8"])], per_layer=False)
    space = SearchSpace(tiny_bert, cfg)
    plan = space.plan_from_params({"g0.bits": 4, "g0.kernel": "int8"})
    linear = {u.name for u in tiny_bert.units if u.kind == "linear"}
    assert all(s.smooth == (DEFAULT_SMOOTH if n in linear else None) for n, s in plan.units.items())
    assert all(s.smooth is None for s in space.plan_from_params({"g0.kernel": "exact"}).units.values())
    off = SearchSpace(tiny_bert, SpaceConfig(groups=[GroupConfig(bits=[8], kernel=["int8"], smooth=None)]))
    assert all(s.smooth is None for s in off.plan_from_params({}).units.values())
    with pytest.raises(ValueError, match="smooth"):
        GroupConfig(smooth=2.0)
