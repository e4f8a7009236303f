"""`latency.source: estimate`: the analytic roofline estimate over the profile's three machine numbers
(the maths is hardware_profiles/roofline.py); deterministic, records no trial attrs."""

from __future__ import annotations

from slimformer.compression.plan import CompressionPlan
from slimformer.evaluators.latency.base import LatencyEstimate, LatencySource
from slimformer.evaluators.latency.registry import register_latency_source
from slimformer.hardware_profiles.roofline import LABEL, estimate_latency
from slimformer.models.base import ModelAdapter


@register_latency_source("estimate")
class RooflineSource(LatencySource):
    """Sum over the forward pass's ops of max(flops / peak, bytes / bandwidth) + per-op overhead."""

    def price_canonical(self, adapter: ModelAdapter, plan: CompressionPlan) -> LatencyEstimate:
        s = self.settings
        ms = estimate_latency(adapter.units, adapter.layers, plan, s.profile, batch=s.batch, seq=s.seq).ms
        return LatencyEstimate(ms, self.name, LABEL)
