"""Recovery of 3- and 2-bit units (issue 15): the learned codes stay on the unit's own grid (at most 2^b levels,
signed scales), the bytes are unchanged and the saved model reloads to the same outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from slimformer.compression.apply import apply_plan
from slimformer.compression.memory import plan_memory
from slimformer.compression.ops import QuantResult, code_range, dequantize
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_compressed, pack_model, packed_bytes, save_compressed
from slimformer.recovery import RecoveryConfig, recover
from slimformer.recovery.trainable import slim_modules


def test_low_bit_units_recover_on_their_grid(tiny_bert, texts, tmp_path: Path) -> None:
    plan = CompressionPlan({u.name: (UnitSpec(bits=2, group_size=16) if u.role == "ffn_in" else
                                     UnitSpec(bits=3, group_size=8, rank=8) if u.role == "query" else
                                     UnitSpec(bits=3) if u.kind == "linear" else UnitSpec(bits=4, group_size=16))
                            for u in tiny_bert.units})
    model = apply_plan(tiny_bert, plan)
    mem = plan_memory(tiny_bert, plan).total_bytes
    batches = tiny_bert.make_batches(texts[:32], 8)
    before = {id(m): m.weight.detach().clone() for m in slim_modules(model)}
    recover(tiny_bert, model, batches, RecoveryConfig(steps=4, lr=3e-3, seed=1))
    low = [m for m in slim_modules(model) if m.fmt.bits in (3, 2)]
    assert low and any(not torch.equal(before[id(m)], m.weight) for m in low)
    for m in low:
        lo, hi = code_range(m.fmt.bits)
        assert int(m.codes.min()) >= lo and int(m.codes.max()) <= hi and m.codes.unique().numel() <= 2 ** m.fmt.bits
        deq = dequantize(QuantResult(m.codes, m.scales, m.fmt.bits, m.fmt.group_size))
        assert torch.equal(m.weight.detach(), deq)
    assert packed_bytes(pack_model(model)) == mem
    loaded = load_compressed(save_compressed(tiny_bert, model, Recipe.from_plan(plan, tiny_bert), tmp_path / "s"))
    with torch.no_grad():
        assert torch.allclose(tiny_bert.output(loaded.model, batches[0]), tiny_bert.output(model, batches[0]),
                              atol=1e-5)
