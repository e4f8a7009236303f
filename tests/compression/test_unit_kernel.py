"""Per-unit compute kernel (UnitSpec.kernel): validation, recipes, the search space, and the torch numerics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimformer.compression import ops
from slimformer.compression.apply import apply_plan
from slimformer.compression.modules import LowRankLinear, SlimLinear, exact_compute
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, save_compressed
from slimformer.errors import PlanError, RecipeError
from slimformer.spaces.config import GroupConfig, SpaceConfig
from slimformer.spaces.space import SearchSpace

Q0, K0, FFN0 = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                "encoder.layer.0.intermediate.dense")


def test_kernel_defaults_to_exact_and_int8_needs_8_or_4_bits() -> None:
    assert UnitSpec().kernel == "exact" and UnitSpec(bits=4).kernel == "exact"
    assert UnitSpec(bits=8, kernel="int8").kernel == "int8" and UnitSpec(bits=4, group_size=32, kernel="int8")
    for bits in (32, 16):
        with pytest.raises(PlanError, match=rf"kernel 'int8' runs 8- or 4-bit weights \(got bits {bits}\)"):
            UnitSpec(bits=bits, kernel="int8")
    with pytest.raises(PlanError, match="kernel must be 'exact' or 'int8' .got 'turbo'"):
        UnitSpec(bits=8, kernel="turbo")  # type: ignore[arg-type]


def test_int8_kernel_on_an_embedding_unit_is_a_plan_error(tiny_bert) -> None:
    plan = CompressionPlan(units={"embeddings.word_embeddings": UnitSpec(bits=8, kernel="int8")})
    with pytest.raises(PlanError, match="kernel 'int8' applies to linear units, not to embeddings.word_embeddings"):
        apply_plan(tiny_bert, plan)


def _int8_plan() -> CompressionPlan:
    return CompressionPlan(units={Q0: UnitSpec(bits=4, group_size=16, kernel="int8"), K0: UnitSpec(bits=8),
                                  FFN0: UnitSpec(rank=8, bits=8, kernel="int8")})


def test_recipe_round_trip_writes_kernel_only_when_int8(tiny_bert) -> None:
    plain = Recipe.from_plan(CompressionPlan(units={K0: UnitSpec(bits=8)}), tiny_bert).to_yaml()
    assert "kernel" not in plain  # recipes of exact-kernel plans read exactly as before
    recipe = Recipe.from_plan(_int8_plan(), tiny_bert)
    text = recipe.to_yaml()
    rules = {r["match"]: r["spec"] for r in yaml.safe_load(text)["rules"]}
    assert rules[Q0]["kernel"] == "int8" and rules[FFN0]["kernel"] == "int8" and "kernel" not in rules[K0]
    back = Recipe.from_yaml(text).to_plan(tiny_bert)
    assert back == _int8_plan() and Recipe.from_yaml(text).to_yaml() == text


@pytest.mark.parametrize(("spec", "needle"), [
    ({"bits": 8, "kernel": "turbo"}, "rules.0.spec.kernel"),
    ({"bits": 32, "kernel": "int8"}, "kernel 'int8' runs 8- or 4-bit weights"),
])
def test_bad_kernel_in_a_recipe_is_one_line(tiny_bert, spec: dict, needle: str) -> None:
    doc = {"slimformer_recipe": 1, "model": {"id": "tiny"}, "rules": [{"match": Q0, "spec": spec}]}
    with pytest.raises(RecipeError, match=needle) as err:
        Recipe.from_yaml(yaml.safe_dump(doc)).to_plan(tiny_bert)
    assert "\n" not in str(err.value)


def test_space_kernel_axis(tiny_bert) -> None:
    cfg = SpaceConfig(groups=[GroupConfig(select={"role": ["embedding"]}, bits=[8], kernel=["exact", "int8"]),
                              GroupConfig(bits=[32, 8, 4], kernel=["exact", "int8"])], per_layer=False)
    space = SearchSpace(tiny_bert, cfg)
    assert list(space.distributions()["g1.kernel"].choices) == ["exact", "int8"]
    plan = space.plan_from_params({"g0.kernel": "int8", "g1.bits": 4, "g1.kernel": "int8"})
    kinds = {u.name: u.kind for u in tiny_bert.units}
    assert plan.units["embeddings.word_embeddings"].kernel == "exact"  # tables have no matmul: ignored
    assert all(s.kernel == ("int8" if kinds[n] == "linear" else "exact") for n, s in plan.units.items())
    assert Q0 not in space.plan_from_params({"g1.bits": 32, "g1.kernel": "int8"}).units  # fp32: no kernel
    assert Q0 not in space.plan_from_params({}).units  # first choices: fp32, exact
    assert GroupConfig().kernel == ["exact"]
    with pytest.raises(ValueError, match="kernel"):
        GroupConfig(kernel=["turbo"])  # type: ignore[list-item]


def test_apply_sets_each_module_kernel_and_saving_keeps_it(tiny_bert, tmp_path: Path) -> None:
    model = apply_plan(tiny_bert, _int8_plan())
    q, k, ffn = (model.get_submodule(n) for n in (Q0, K0, FFN0))
    assert isinstance(q, SlimLinear) and q.kernel == "int8" and k.kernel == "exact"
    assert isinstance(ffn, LowRankLinear) and ffn.down.kernel == ffn.up.kernel == "int8"
    out = save_compressed(tiny_bert, model, Recipe.from_plan(_int8_plan(), tiny_bert), tmp_path / "c")
    loaded = load_compressed(out).model
    assert loaded.get_submodule(Q0).kernel == "int8" and loaded.get_submodule(K0).kernel == "exact"
    assert loaded.get_submodule(FFN0).up.kernel == "int8"


def test_int8_forward_quantises_activations_and_exact_compute_restores(tiny_bert) -> None:
    model = apply_plan(tiny_bert, _int8_plan())
    q = model.get_submodule(Q0)
    x = torch.randn(2, 5, q.in_features)
    y = q(x)
    assert torch.equal(y, ops.int8_linear(x, q.weight, q.bias))
    assert not torch.allclose(y, torch.nn.functional.linear(x, q.weight, q.bias), atol=1e-6)
    with exact_compute(model):
        assert q.kernel == "exact" and torch.equal(q(x), torch.nn.functional.linear(x, q.weight, q.bias))
    assert q.kernel == "int8"


def test_dynamic_quantisation_rule() -> None:
    """uint8 per tensor over [min(0, min), max(0, max)], zero point rounded, codes 0..255; int8 weights per row."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    xq, scale = ops.dynamic_quantize_uint8(x)
    assert float(scale) == pytest.approx(4.0 / 255.0)
    zp = round(1.0 / float(scale))  # 63.75 -> 64
    assert torch.equal(xq + zp, torch.clamp(torch.round(x / scale) + zp, 0, 255))
    assert float((xq + zp).min()) >= 0 and float((xq + zp).max()) <= 255
    positive = torch.tensor([[1.0, 2.0]])
    assert float(ops.dynamic_quantize_uint8(positive)[1]) == pytest.approx(2.0 / 255.0)  # range includes 0
    assert float(ops.dynamic_quantize_uint8(torch.zeros(3))[1]) == 1.0  # empty range: scale 1
    w = torch.tensor([[0.4, -1.0, 0.2], [0.0, 0.0, 0.0]])
    wq, s8 = ops.requantize_rows_int8(w, 127)
    assert torch.equal(wq[0], torch.tensor([51.0, -127.0, 25.0])) and torch.equal(wq[1], torch.zeros(3))
    assert np.isclose(float(s8[0]), 1.0 / 127.0)
    wq7, s7 = ops.requantize_rows_int8(w, 64)  # +-64 (x86 without VNNI)
    assert torch.equal(wq7[0], torch.tensor([26.0, -64.0, 13.0])) and np.isclose(float(s7[0]), 1.0 / 64.0)


def test_int8_weight_range_follows_the_cpu_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """127 on CPUs whose u8 x s8 GEMM accumulates exactly (VNNI/AMX, non-x86), 64 on AVX2 without VNNI (saturating
    int16 pairs); the environment variable overrides, and a bad value is a one-line error."""
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split() if \
        Path("/proc/cpuinfo").is_file() else []
    ops.int8_weight_qmax.cache_clear()
    try:
        monkeypatch.delenv(ops.INT8_QMAX_ENV, raising=False)
        expected = 64 if "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else 127
        assert ops.int8_weight_qmax() == expected
        ops.int8_weight_qmax.cache_clear()
        monkeypatch.setenv(ops.INT8_QMAX_ENV, "64" if expected == 127 else "127")
        assert ops.int8_weight_qmax() == 191 - expected
        ops.int8_weight_qmax.cache_clear()
        monkeypatch.setenv(ops.INT8_QMAX_ENV, "100")
        with pytest.raises(PlanError, match="SLIMFORMER_INT8_WEIGHT_QMAX must be 64 or 127"):
            ops.int8_weight_qmax()
    finally:
        ops.int8_weight_qmax.cache_clear()


def test_int8_linear_is_straight_through_under_gradients() -> None:
    """Recovery trains through int8 units: the gradient is the fp32 linear's, the value the int8 kernel's."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = ops.int8_linear(x, w, b)
    with torch.no_grad():
        exact_value = ops.int8_linear(x, w, b)
    assert torch.allclose(y, exact_value, atol=1e-5)
    y.sum().backward()
    assert torch.allclose(w.grad, torch.ones(3, 8).T @ x.detach())
    assert torch.allclose(x.grad, torch.ones(3, 8) @ w.detach())
    assert torch.allclose(b.grad, torch.full((8,), 3.0))
