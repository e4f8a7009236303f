"""The whole-graph residual's maths: what micro-benchmarks of single kernels miss in a full exported model.

This module prices with a fitted `Residual` (predict.py uses it); fitting it is residual_fit.py.

Fitted at calibration on full exports of reference models (uniform fp32, int8 per row, int8 g32, int4
g32 and an fp32 model with half its heads and FFN neurons pruned, at a few shapes), never on validation
plans. Its terms: one in-graph scale per kernel family (MatMul, DequantizeLinear+Gemm int8,
MatMulNBits int8, MatMulNBits int4: the same kernel runs slower or faster inside a model than alone,
e.g. because its dequantised weights evict the next op's data), bounded to [0.8, 1.6] so that they
cannot trade off freely against the glue terms (the references scale both with tokens), plus glue per block:
a constant, a term per token, a term per token and kept head and one per attention score (kept heads x
seq^2: the masking, NaN guard and softmax the exported attention runs over scores).
Low-rank factors (the two thin MatMuls of a rank-r linear) form a family of their own ('lowrank', fitted on
two low-rank reference plans): at 17 tokens a chain of thin MatMuls runs faster in the graph than alone
(the ViT's held-out errors grew with the number of low-rank linears, correlation 0.66, before it).
"""

from __future__ import annotations

from slimformer.compression.plan import CompressionPlan, LayerSpec
from slimformer.hardware_profiles.profile import Residual
from slimformer.models.base import ModelAdapter

FAMILIES = ("matmul", "dequant_gemm:8", "matmulnbits:8", "matmulnbits:4", "lowrank")
LOWRANK_PREFIX = "lowrank|"  # breakdown key of a low-rank factor's kernel: 'lowrank|matmulnbits:4:32'


def kernel_family(cls: str) -> str:
    """'matmulnbits:4:32' -> 'matmulnbits:4'; 'lowrank|<class>' -> 'lowrank'; classes outside FAMILIES ->
    'other' (kept at scale 1)."""
    if cls.startswith(LOWRANK_PREFIX):
        return "lowrank"
    fam = ":".join(cls.split(":")[:2])
    return fam if fam in FAMILIES else "other"


Glue = tuple[float, float, float, float]


def glue_features(adapter: ModelAdapter, plan: CompressionPlan, batch: int, seq: int) -> Glue:
    """(kept heads x batch x seq^2 / 1e6 summed over layers, kept-head share x tokens / 1000 summed over
    layers, layers x tokens / 1000, layers)."""
    tokens = batch * seq * 1e-3
    heads = share = 0.0
    for i in adapter.layers:
        kept = plan.layers.get(i.index, LayerSpec()).heads_kept or i.num_heads
        heads += kept
        share += kept / i.num_heads
    n = len(adapter.layers)
    return heads * batch * seq * seq * 1e-6, share * tokens, n * tokens, float(n)


def apply_residual(res: Residual, breakdown: dict[str, float], glue: Glue) -> float:
    """Predicted ms from the per-class kernel ms and the plan's glue features."""
    ms = 0.0
    for cls, v in breakdown.items():
        fam = kernel_family(cls)
        if fam == "lowrank" and fam not in res.class_scale:  # a profile fitted before the family existed
            fam = kernel_family(cls[len(LOWRANK_PREFIX):])
        ms += v * (res.class_scale.get(fam, res.scale) if fam != "other" else 1.0)
    return ms + glue[0] * res.per_score_ns + glue[1] * res.per_layer_head_token_us \
        + glue[2] * res.per_layer_token_us + glue[3] * res.per_layer_ms + res.const_ms
