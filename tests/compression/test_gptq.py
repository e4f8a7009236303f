"""GPTQ rounding: same storage as round-to-nearest, lower output error on the calibration inputs."""

from __future__ import annotations

import pytest
import torch

from slimformer.compression import ops
from slimformer.compression.apply import apply_plan
from slimformer.compression.calibration import collect_hessians
from slimformer.compression.gptq import gptq_quantize
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.errors import PlanError


def _data(out_f: int = 48, in_f: int = 64, n: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    # correlated inputs with a few strong features: where error compensation matters
    x = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    x[:, :4] *= 8.0
    return w, x, x.T @ x / n


@pytest.mark.parametrize("bits,group", [(4, 16), (4, None), (8, 32)])
def test_gptq_lowers_output_error_versus_round_to_nearest(bits: int, group: int | None) -> None:
    w, x, h = _data()
    rtn = ops.dequantize(ops.quantize(w, bits, group))
    q = gptq_quantize(w, h, bits, group)
    gq = ops.dequantize(q)
    err_rtn = (x @ (rtn - w).T).square().mean()
    err_gptq = (x @ (gq - w).T).square().mean()
    assert err_gptq < err_rtn
    qmax = 2 ** (bits - 1) - 1
    assert int(q.codes.abs().max()) <= qmax
    assert q.scales.shape == (w.shape[0], 1 if group is None else -(-w.shape[1] // group))


def test_gptq_keeps_masked_weights_zero() -> None:
    w, _, h = _data()
    mask = ops.magnitude_mask(w, 0.5)
    q = gptq_quantize(w, h, 4, 16, mask=mask)
    assert torch.all(q.codes[~mask] == 0)
    assert torch.all(ops.dequantize(q)[~mask] == 0)


def test_gptq_rejects_wrong_hessian_shape() -> None:
    w, _, _ = _data()
    with pytest.raises(PlanError, match="Hessian has shape"):
        gptq_quantize(w, torch.eye(3), 4, 16)


def test_gptq_plan_needs_hessians(tiny_bert) -> None:
    plan = CompressionPlan(units={tiny_bert.units[1].name: UnitSpec(bits=4, group_size=8, method="gptq")})
    with pytest.raises(PlanError, match="needs calibration data"):
        apply_plan(tiny_bert, plan)


def test_gptq_in_apply_improves_fidelity_on_calibration_text(tiny_bert, texts) -> None:
    batches = tiny_bert.make_batches(texts[:32], 16)
    hessians = collect_hessians(tiny_bert, batches)
    names = [u.name for u in tiny_bert.units if u.kind == "linear"]
    with torch.no_grad():
        ref = torch.cat([tiny_bert.output(tiny_bert.model, b) for b in batches])

    def err(method: str) -> float:
        plan = CompressionPlan(units={n: UnitSpec(bits=4, group_size=8, method=method) for n in names})
        model = apply_plan(tiny_bert, plan, hessians=hessians)
        with torch.no_grad():
            out = torch.cat([tiny_bert.output(model, b) for b in batches])
        return float((out - ref).square().mean())

    assert err("gptq") < err("rtn")


def test_recipe_round_trips_method(tiny_bert) -> None:
    plan = CompressionPlan(units={tiny_bert.units[1].name: UnitSpec(bits=4, group_size=8, method="gptq")})
    rec = Recipe.from_plan(plan, tiny_bert)
    back = Recipe.from_yaml(rec.to_yaml())
    assert back == rec
    assert back.to_plan(tiny_bert).unit(tiny_bert.units[1].name).method == "gptq"
