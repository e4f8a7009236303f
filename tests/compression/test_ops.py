"""Invariants of the pure compression kernels in slimformer.compression.ops."""

from __future__ import annotations

import math

import pytest
import torch

from slimformer.compression import ops
from slimformer.errors import PlanError


def _w(out: int = 48, n_in: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- SVD


def test_lowrank_factors_have_rank_at_most_r_and_full_rank_reconstructs() -> None:
    W = _w()
    res = ops.svd(W)
    assert res.col_scale is None
    for r in (1, 4, 16):
        A, B = ops.lowrank_factors(res, r)
        assert A.shape == (48, r) and B.shape == (r, 32)
        assert A.dtype == B.dtype == torch.float32
        assert int(torch.linalg.matrix_rank(A @ B)) <= r
    A, B = ops.lowrank_factors(res, 32)
    assert _rel(A @ B, W) < 1e-5


def test_factors_are_balanced() -> None:
    res = ops.svd(_w())
    A, B = ops.lowrank_factors(res, 8)
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_error_decreases_with_rank_and_matches_eckart_young() -> None:
    W = _w()
    res = ops.svd(W)
    errs = []
    for r in range(1, 33):
        A, B = ops.lowrank_factors(res, r)
        errs.append(float((W - A @ B).norm()))
        tail = float(res.S[r:].double().square().sum().sqrt())
        assert errs[-1] == pytest.approx(tail, rel=1e-3, abs=1e-4)
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False))


def test_data_aware_svd_beats_plain_svd_in_activation_metric() -> None:
    W = _w(64, 48, seed=1)
    g = torch.Generator().manual_seed(2)
    raw = torch.rand(48, generator=g) * 0.1
    raw[:6] = 20.0  # a few dominant input features
    s = ops.activation_scale(raw)
    r = 8
    A0, B0 = ops.lowrank_factors(ops.svd(W), r)
    res = ops.svd(W, act_scale=s)
    torch.testing.assert_close(res.col_scale, s)
    A1, B1 = ops.lowrank_factors(res, r)
    assert A1.shape == (64, r) and B1.shape == (r, 48)
    err_plain = float(((W - A0 @ B0) * s).norm())
    err_aware = float(((W - A1 @ B1) * s).norm())
    assert err_aware < 0.8 * err_plain
    # full rank still reconstructs W itself (the scale is undone in B)
    A, B = ops.lowrank_factors(res, 48)
    assert _rel(A @ B, W) < 1e-5


def test_rank_out_of_range_and_bad_act_scale_raise() -> None:
    res = ops.svd(_w())
    with pytest.raises(PlanError, match="rank must be between 1 and 32"):
        ops.lowrank_factors(res, 0)
    with pytest.raises(PlanError, match="rank must be between 1 and 32"):
        ops.lowrank_factors(res, 33)
    with pytest.raises(PlanError, match="act_scale must have shape"):
        ops.svd(_w(), act_scale=torch.ones(48))
    with pytest.raises(PlanError, match="strictly positive"):
        ops.svd(_w(), act_scale=torch.zeros(32))


def test_activation_scale_is_positive_with_mean_one() -> None:
    x = torch.tensor([0.0, 1.0, 3.0, float("nan"), 4.0])
    s = ops.activation_scale(x)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert float(s.mean()) == pytest.approx(1.0, rel=1e-6)
    assert float(s[2] / s[1]) == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(ops.activation_scale(torch.zeros(4)), torch.ones(4))


# ------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73])
def test_magnitude_mask_zeroes_exact_share_of_smallest(sparsity: float) -> None:
    W = _w(30, 20)
    keep = ops.magnitude_mask(W, sparsity)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert int((~keep).sum()) == round(sparsity * W.numel())
    if sparsity == 0.0:
        assert bool(keep.all())
    else:
        assert float(W.abs()[~keep].max()) <= float(W.abs()[keep].min())


def test_magnitude_mask_exact_count_with_ties() -> None:
    W = torch.ones(4, 5)
    W[0, 0] = 2.0
    keep = ops.magnitude_mask(W, 0.5)
    assert int((~keep).sum()) == 10
    assert bool(keep[0, 0])
    torch.testing.assert_close(keep, ops.magnitude_mask(W.clone(), 0.5), rtol=0, atol=0)
    with pytest.raises(PlanError, match="sparsity"):
        ops.magnitude_mask(W, 1.0)


def test_mask_2_4_keeps_two_largest_in_every_group() -> None:
    W = _w(16, 24)
    keep = ops.mask_2_4(W)
    groups = keep.reshape(16, 6, 4)
    assert bool((groups.sum(-1) == 2).all())
    a = W.abs().reshape(16, 6, 4)
    kept_min = torch.where(groups, a, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, a).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_mask_2_4_wrong_shape_raises() -> None:
    with pytest.raises(PlanError, match=r"divisible by 4.*\(8, 10\)"):
        ops.mask_2_4(torch.ones(8, 10))


# -------------------------------------------------------------------------------------- quantisation


def test_int4_group_codes_use_at_most_15_levels() -> None:
    W = _w(32, 40)
    q = ops.quantize(W, 4, 16)
    assert q.codes.dtype == torch.int8 and q.codes.shape == W.shape
    assert q.scales.dtype == torch.float32 and q.scales.shape == (32, 3)  # partial last group
    assert int(q.codes.min()) >= -7 and int(q.codes.max()) <= 7
    assert q.codes.unique().numel() <= 15
    assert ops.dequantize(q).shape == W.shape


def test_int8_per_channel_codes_use_at_most_255_levels() -> None:
    W = _w(64, 512)
    q = ops.quantize(W, 8, None)
    assert q.scales.shape == (64, 1)
    assert int(q.codes.min()) >= -127 and int(q.codes.max()) <= 127
    assert q.codes.unique().numel() <= 255


def test_quant_error_ordering() -> None:
    W = _w(64, 256, seed=3)
    W[:, ::37] *= 8.0  # outlier columns make per-channel scales coarse
    err8 = _rel(ops.fake_quant(W, 8, None), W)
    err4_row = _rel(ops.fake_quant(W, 4, None), W)
    err4_g64 = _rel(ops.fake_quant(W, 4, 64), W)
    err4_g16 = _rel(ops.fake_quant(W, 4, 16), W)
    assert err8 < err4_g16 < err4_g64 < err4_row


def test_clipping_search_never_worse_than_max_abs_scale() -> None:
    W = _w(32, 64, seed=4)
    q = ops.quantize(W, 4, 32)
    groups = W.reshape(32, 2, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    naive = (torch.round(groups / scale).clamp(-7, 7) * scale).reshape(32, 64)
    err_q = (ops.dequantize(q) - W).square().reshape(32, 2, 32).sum(-1)
    err_naive = (naive - W).square().reshape(32, 2, 32).sum(-1)
    assert bool((err_q <= err_naive + 1e-6).all())
    assert float(err_q.sum()) < float(err_naive.sum())  # clipping helps int4 on Gaussian weights


def test_masked_weights_stay_zero_and_do_not_set_scale() -> None:
    W = _w(16, 32, seed=5)
    W[0, 3] = 100.0  # huge outlier that is pruned away
    keep = ops.magnitude_mask(W, 0.5)
    keep[0, 3] = False
    for bits, gs in ((8, None), (4, 8)):
        q = ops.quantize(W, bits, gs, mask=keep)
        w_hat = ops.dequantize(q)
        assert bool((w_hat[~keep] == 0).all())
        assert bool((q.codes[~keep] == 0).all())
    q = ops.quantize(W, 8, None, mask=keep)
    assert float(q.scales[0, 0]) <= float(W[0][keep[0]].abs().max()) / 127 + 1e-7


def test_zero_rows_get_unit_scale_and_bad_bits_raise() -> None:
    W = _w(4, 16)
    W[2] = 0.0
    q = ops.quantize(W, 4, 8)
    assert bool((q.scales[2] == 1.0).all()) and bool((q.codes[2] == 0).all())
    assert bool(torch.isfinite(ops.dequantize(q)).all())
    with pytest.raises(PlanError, match="supports bits 8, 4, 3, 2"):  # 3 and 2 bits are valid since issue 15
        ops.quantize(W, 5, None)
    with pytest.raises(PlanError, match="mask must be a bool tensor"):
        ops.quantize(W, 8, None, mask=torch.ones(4, 16))


# ------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(3, 5), (4, 8), (1, 1)])
def test_pack_int4_round_trip(shape: tuple[int, int]) -> None:
    n = math.prod(shape)
    codes = (torch.arange(n) % 16 - 8).to(torch.int8).reshape(shape)
    packed = ops.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    back = ops.unpack_int4(packed, n, shape)
    assert back.dtype == torch.int8 and torch.equal(back, codes)
    q = ops.quantize(_w(7, 9), 4, 4)
    assert torch.equal(ops.unpack_int4(ops.pack_int4(q.codes), 63, (7, 9)), q.codes)
    with pytest.raises(PlanError, match=r"\[-8, 7\]"):
        ops.pack_int4(torch.tensor([9], dtype=torch.int8))


@pytest.mark.parametrize("shape", [(13,), (3, 7), (4, 8)])
def test_pack_bitmask_round_trip(shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.4).reshape(shape)
    packed = ops.pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    back = ops.unpack_bitmask(packed, shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)


@pytest.mark.parametrize("shape", [(3, 12), (4, 8)])
def test_pack_2_4_indices_round_trip(shape: tuple[int, int]) -> None:
    mask = ops.mask_2_4(_w(*shape, seed=6))
    packed = ops.pack_2_4_indices(mask)
    n_groups = shape[0] * shape[1] // 4
    assert packed.dtype == torch.uint8 and packed.numel() == (n_groups + 1) // 2
    assert torch.equal(ops.unpack_2_4_indices(packed, shape), mask)
    with pytest.raises(PlanError, match="not a 2:4 mask"):
        ops.pack_2_4_indices(torch.ones(shape, dtype=torch.bool))


# ------------------------------------------------------------------------------- structured pruning


def test_head_importance_finds_large_head_unfused_and_fused() -> None:
    hidden, heads = 32, 4
    hd = hidden // heads
    q, k, v, o = (_w(hidden, hidden, seed=s) * 0.1 for s in range(4))
    q[2 * hd : 3 * hd] *= 50.0
    scores = ops.head_importance([q, k, v], o, heads, fused_qkv=False)
    assert scores.shape == (heads,) and int(scores.argmax()) == 2
    o2 = o.clone()
    o2[:, 1 * hd : 2 * hd] *= 50.0
    assert int(ops.head_importance([q * 0 + 0.1, k, v], o2, heads, fused_qkv=False).argmax()) == 1
    # fused out dim is [3, heads, head_dim]: a big query head 2 or value head 1 must be found there
    base = torch.cat([_w(hidden, hidden, seed=s) * 0.1 for s in (4, 5, 6)])
    for block, head in ((0, 2), (2, 1)):
        qkv = base.clone()
        start = block * hidden + head * hd
        qkv[start : start + hd] *= 50.0
        fused = ops.head_importance(qkv, o, heads, fused_qkv=True)
        assert fused.shape == (heads,) and int(fused.argmax()) == head
    with pytest.raises(PlanError, match="not divisible"):
        ops.head_importance(base, o, 5, fused_qkv=True)


def test_neuron_importance_and_top_k() -> None:
    in_w, out_w = _w(64, 16, seed=7), _w(16, 64, seed=8)
    in_w[37] *= 20.0
    scores = ops.neuron_importance(in_w, out_w)
    assert scores.shape == (64,) and int(scores.argmax()) == 37
    keep = ops.top_k_sorted(scores, 10)
    assert keep.dtype == torch.long and 37 in keep.tolist()
    assert keep.tolist() == sorted(keep.tolist())
    assert set(keep.tolist()) == set(torch.topk(scores, 10).indices.tolist())
    assert ops.top_k_sorted(torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0]), 2).tolist() == [1, 2]
    with pytest.raises(PlanError, match="k must be between 1 and 5"):
        ops.top_k_sorted(torch.ones(5), 6)


# ------------------------------------------------------------------------------------- determinism


def test_all_functions_are_deterministic_and_leave_inputs_untouched() -> None:
    W = _w(16, 32, seed=9)
    s = ops.activation_scale(torch.rand(32, generator=torch.Generator().manual_seed(1)))
    W0, s0 = W.clone(), s.clone()
    keep = ops.magnitude_mask(W, 0.3)

    def run() -> list[torch.Tensor]:
        res = ops.svd(W, act_scale=s)
        A, B = ops.lowrank_factors(res, 5)
        q = ops.quantize(W, 4, 8, mask=keep)
        m24 = ops.mask_2_4(W)
        return [
            res.U,
            res.S,
            res.Vh,
            A,
            B,
            ops.activation_scale(s),
            ops.magnitude_mask(W, 0.3),
            m24,
            q.codes,
            q.scales,
            ops.dequantize(q),
            ops.fake_quant(W, 8, None),
            ops.pack_int4(q.codes),
            ops.pack_bitmask(keep),
            ops.pack_2_4_indices(m24),
            ops.head_importance(W, W.T.contiguous(), 4, fused_qkv=False),
            ops.neuron_importance(W, W.T.contiguous()),
            ops.top_k_sorted(W[0], 4),
        ]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(W, W0) and torch.equal(s, s0)
