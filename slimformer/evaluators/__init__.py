"""Evaluators: what a compressed candidate costs (latency, through a pluggable `LatencySource`) and how good it
still is (fidelity)."""

from __future__ import annotations

from slimformer.evaluators.latency import (
    LatencyEstimate,
    LatencySettings,
    LatencySource,
    make_latency_source,
)
from slimformer.evaluators.quality import FidelityEvaluator, QualityResult, neighbour_agreement

__all__ = ["FidelityEvaluator", "LatencyEstimate", "LatencySettings", "LatencySource", "QualityResult",
           "make_latency_source", "neighbour_agreement"]
