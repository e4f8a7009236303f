"""Better rounding (issue 15 item 4): GPTQ with act-order and a damping search ("gptq-ao"), least-squares
reconstruction of the scales ("recon"), the AWQ-style channel scaling measured against them; recipes carry the
new methods and bits (version 2), older recipes still apply, unknown values fail with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slimformer.compression import ops
from slimformer.compression.apply import apply_plan
from slimformer.compression.awq import awq_quantize, effective_weight
from slimformer.compression.calibration import collect_hessians
from slimformer.compression.gptq import gptq_quantize, gptq_search, output_error
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import RECIPE_VERSION, Recipe
from slimformer.compression.reconstruct import reconstruct, refit_scales
from slimformer.errors import ConfigError, PlanError, RecipeError

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _data(out_f: int = 32, in_f: int = 64, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    x[:, :4] *= 8.0  # a few strong input channels, where act-order and AWQ matter
    return w, x.T @ x / n


@pytest.mark.parametrize("bits,group", [(4, 16), (4, None), (3, 32), (2, 16)])
def test_gptq_ao_and_recon_never_lose_to_gptq_on_the_calibration_error(bits: int, group: int | None) -> None:
    w, h = _data()
    errs = {}
    for name, q in (("rtn", ops.quantize(w, bits, group)), ("gptq", gptq_quantize(w, h, bits, group)),
                    ("gptq-ao", gptq_search(w, h, bits, group)), ("recon", reconstruct(w, h, bits, group))):
        lo, hi = ops.code_range(bits)
        assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
        assert q.scales.shape == (32, 1 if group is None else 64 // group)  # same storage as gptq
        errs[name] = output_error(w, ops.dequantize(q), h)
    assert errs["gptq"] < errs["rtn"]
    assert errs["recon"] <= errs["gptq-ao"] <= errs["gptq"]
    assert errs["recon"] < errs["gptq"]


def test_act_order_keeps_groups_contiguous_and_masked_weights_zero() -> None:
    w, h = _data()
    mask = ops.magnitude_mask(w, 0.5)
    q = gptq_quantize(w, h, 4, 16, mask=mask, act_order=True)
    assert torch.all(q.codes[~mask] == 0) and torch.all(ops.dequantize(q)[~mask] == 0)
    # static scales: the group scales are round-to-nearest's of the (masked) weights, whatever the column order
    assert torch.equal(q.scales, ops.quantize(w * mask, 4, 16, mask).scales)


def test_refit_scales_is_the_least_squares_optimum() -> None:
    w, h = _data()
    q = gptq_quantize(w, h, 3, 16)
    r = refit_scales(w, q, h)
    assert torch.equal(r.codes, q.codes)
    best = output_error(w, ops.dequantize(r), h)
    assert best < output_error(w, ops.dequantize(q), h)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # any perturbation of the solved scales is worse
        bumped = ops.QuantResult(r.codes, r.scales * (1 + 0.01 * torch.randn(r.scales.shape, generator=g)), 3, 16)
        assert output_error(w, ops.dequantize(bumped), h) > best


def test_awq_never_loses_to_round_to_nearest_on_the_calibration_error() -> None:
    w, h = _data()
    q, s = awq_quantize(w, h, 4, 16)
    assert s.shape == (64,) and bool((s > 0).all())
    assert output_error(w, effective_weight(q, s), h) <= output_error(w, ops.fake_quant(w, 4, 16), h)


def test_data_methods_need_hessians_and_improve_fidelity(tiny_bert, texts) -> None:
    names = [u.name for u in tiny_bert.units if u.kind == "linear"]
    with pytest.raises(PlanError, match="method recon needs calibration data"):
        apply_plan(tiny_bert, CompressionPlan({names[0]: UnitSpec(bits=4, group_size=8, method="recon")}))
    batches = tiny_bert.make_batches(texts[:32], 16)
    hessians = collect_hessians(tiny_bert, batches)
    with torch.no_grad():
        ref = torch.cat([tiny_bert.output(tiny_bert.model, b) for b in batches])

    def err(method: str, bits: int) -> float:
        plan = CompressionPlan({n: UnitSpec(bits=bits, group_size=8, method=method) for n in names})
        model = apply_plan(tiny_bert, plan, hessians=hessians)
        with torch.no_grad():
            return float((torch.cat([tiny_bert.output(model, b) for b in batches]) - ref).square().mean())

    for bits in (4, 2):
        assert err("recon", bits) < err("rtn", bits)
        assert err("gptq-ao", bits) < err("rtn", bits)


def test_recipes_carry_new_methods_and_bits_at_version_2(tiny_bert) -> None:
    lin = [u.name for u in tiny_bert.units if u.kind == "linear"]
    old = CompressionPlan({lin[0]: UnitSpec(bits=4, group_size=8, method="gptq")})
    rec = Recipe.from_plan(old, tiny_bert)
    assert rec.slimformer_recipe == 1  # nothing new in it: readable by older slimformers
    for spec in (UnitSpec(bits=4, group_size=8, method="recon"), UnitSpec(bits=2, group_size=8),
                 UnitSpec(bits=3, method="gptq-ao", rank=4)):
        plan = CompressionPlan({lin[0]: spec, lin[1]: UnitSpec(bits=8)})
        rec = Recipe.from_plan(plan, tiny_bert)
        assert rec.slimformer_recipe == 2 == RECIPE_VERSION
        back = Recipe.from_yaml(rec.to_yaml())
        assert back == rec and back.to_plan(tiny_bert).unit(lin[0]) == spec


def test_an_old_recipe_still_applies(tiny_bert) -> None:
    lin = [u.name for u in tiny_bert.units if u.kind == "linear"]
    text = (f"slimformer_recipe: 1\nmodel: {{id: tiny}}\nrules:\n- match: {lin[0]}\n"
            "  spec: {bits: 4, group_size: 8, method: gptq}\n- match: 're:.*'\n  spec: {bits: 8}\n")
    plan = Recipe.from_yaml(text).to_plan(tiny_bert)
    assert plan.unit(lin[0]) == UnitSpec(bits=4, group_size=8, method="gptq")
    assert apply_plan(tiny_bert, plan, rtn_fallback=True) is not None


@pytest.mark.parametrize("spec,pattern", [
    ({"bits": 4, "method": "awq"}, r"rules\.0\.spec\.method"),
    ({"bits": 6}, r"rules\.0\.spec\.bits"),
])
def test_unknown_method_or_bits_is_one_line(spec, pattern) -> None:
    import yaml

    text = yaml.safe_dump({"slimformer_recipe": 2, "model": {"id": "m"}, "rules": [{"match": "x", "spec": spec}]})
    with pytest.raises(RecipeError, match=pattern) as exc:
        Recipe.from_yaml(text)
    assert "\n" not in str(exc.value)


def test_newer_recipe_version_is_one_line() -> None:
    with pytest.raises(RecipeError, match="recipe version 3 is newer than this slimformer reads") as exc:
        Recipe.from_yaml("slimformer_recipe: 3\nmodel: {id: m}\nrules: []\n")
    assert "\n" not in str(exc.value)


def test_space_offers_low_bits_and_new_methods_for_linears_only(tmp_path_factory) -> None:
    import helpers

    from slimformer.models import load
    from slimformer.spaces.config import SpaceConfig
    from slimformer.spaces.space import SearchSpace, spec_from_choice

    adapter = load(str(helpers.tiny_model_dir(tmp_path_factory)))
    ok = SpaceConfig.model_validate({"groups": [
        {"select": {"role": helpers.LINEAR_ROLES}, "bits": [4, 3, 2], "group_size": [16], "method": ["recon"]}]})
    sp = SearchSpace(adapter, ok)
    plan = sp.plan_from_params(sp.default_params() | sp.uniform_params(bits=2, group_size=16, method="recon"))
    assert {s.bits for s in plan.units.values()} == {2} and {s.method for s in plan.units.values()} == {"recon"}
    assert spec_from_choice({"bits": 3, "group_size": 16, "method": "gptq-ao"}, (8, 32)) == \
        UnitSpec(bits=3, group_size=16, method="gptq-ao")
    bad = SpaceConfig.model_validate({"groups": [{"select": {"role": ["embedding"]}, "bits": [4, 2]}]})
    with pytest.raises(ConfigError, match=r"space.groups\[0\].bits 2 applies to linear units"):
        SearchSpace(adapter, bad)
