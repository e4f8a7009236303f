"""`latency.source: calibrated`: the profile's fitted onnxruntime kernel model (hardware_profiles/predict.py);
deterministic, records no trial attrs. A profile without a calibrated model is a ConfigError when the source is
resolved (registry.resolved_source)."""

from __future__ import annotations

from slimformer.compression.plan import CompressionPlan
from slimformer.evaluators.latency.base import LatencyEstimate, LatencySource
from slimformer.evaluators.latency.registry import register_latency_source
from slimformer.hardware_profiles.predict import LABEL, predict_canonical
from slimformer.models.base import ModelAdapter


@register_latency_source("calibrated")
class CalibratedSource(LatencySource):
    """Per-kernel-class tables plus the whole-graph residual of the model's family."""

    def price_canonical(self, adapter: ModelAdapter, plan: CompressionPlan) -> LatencyEstimate:
        s = self.settings
        return LatencyEstimate(predict_canonical(adapter, plan, s.batch, s.seq, s.profile).ms, self.name, LABEL)
