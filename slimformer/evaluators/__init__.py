"""Evaluators: what a compressed candidate costs (latency estimate) and how good it still is."""

from __future__ import annotations

from slimformer.evaluators.latency import (
    LatencyEstimate,
    OpCost,
    estimate_latency,
    flops_proxy,
    latency_breakdown,
)
from slimformer.evaluators.quality import FidelityEvaluator, QualityResult, neighbour_agreement

__all__ = ["FidelityEvaluator", "LatencyEstimate", "OpCost", "QualityResult", "estimate_latency", "flops_proxy",
           "latency_breakdown", "neighbour_agreement"]
