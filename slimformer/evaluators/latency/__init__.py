"""Latency as one pluggable concept: a `LatencySource` per `latency.source` value (registry.py), each
pricing a plan into a typed `LatencyEstimate` (base.py): roofline.py (`estimate`), calibrated.py
(`calibrated`), measured.py (`measured`). Importing the package registers all three."""

from __future__ import annotations

from slimformer.evaluators.latency.base import (
    LatencyEstimate,
    LatencySettings,
    LatencySource,
    MeasuredSpread,
)
from slimformer.evaluators.latency.calibrated import CalibratedSource
from slimformer.evaluators.latency.measured import LABEL as MEASURED_LABEL
from slimformer.evaluators.latency.measured import LatencyMeter, MeasuredLatency, MeasuredSource
from slimformer.evaluators.latency.registry import (
    latency_source_names,
    make_latency_source,
    register_latency_source,
    resolved_source,
    source_label,
)
from slimformer.evaluators.latency.roofline import RooflineSource

__all__ = ["MEASURED_LABEL", "CalibratedSource", "LatencyEstimate", "LatencyMeter", "LatencySettings",
           "LatencySource", "MeasuredLatency", "MeasuredSource", "MeasuredSpread", "RooflineSource",
           "latency_source_names", "make_latency_source", "register_latency_source", "resolved_source",
           "source_label"]
