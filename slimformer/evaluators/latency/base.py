"""The latency-source contract: what prices a plan's latency objective, and the typed value it returns.

A search prices every sampled plan through one `LatencySource`, chosen by the `latency.source` config value
(registry.py); the three sources are roofline.py (`estimate`), calibrated.py (`calibrated`) and measured.py
(`measured`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from slimformer.compression.plan import CompressionPlan
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.hardware_profiles.profile import HardwareProfile
from slimformer.models.base import Batch, ModelAdapter

TrialAttr = float | int | str


@dataclass(frozen=True)
class MeasuredSpread:
    """How a measured latency was timed: interquartile range (ms) of `runs` timed runs, threads, kernels."""

    iqr_ms: float
    runs: int
    threads: int
    kernels: str


@dataclass(frozen=True)
class LatencyEstimate:
    """One plan's latency objective (ms) and where it came from.

    source: the registry name of the source that priced it ("estimate", "calibrated", "measured");
    label: what actually produced `ms` (e.g. "estimate (roofline)"; a measured source's over-budget plan
    carries the roofline label); recorded_source: the trial's `latency_source` attr, or None when the source
    records none (only `measured` records one); spread: how a measured value was timed (None otherwise).
    """

    ms: float
    source: str
    label: str
    recorded_source: str | None = None
    spread: MeasuredSpread | None = None

    def trial_attrs(self) -> dict[str, TrialAttr]:
        """The trial user attrs recorded next to `latency_ms` (empty for estimate and calibrated)."""
        if self.recorded_source is None:
            return {}
        attrs: dict[str, TrialAttr] = {"latency_source": self.recorded_source}
        if self.spread is not None:
            attrs.update(latency_iqr_ms=self.spread.iqr_ms, latency_runs=self.spread.runs,
                         latency_threads=self.spread.threads, latency_kernels=self.spread.kernels)
        return attrs


@dataclass(frozen=True)
class LatencySettings:
    """What a source is built from (the search's `latency` config, resolved): the profile, the priced
    shape, and for `measured` how to time (threads None: torch's thread count when the first plan is
    timed), the rows inputs are built from, how to build a candidate and which plans may be exported."""

    profile: HardwareProfile
    batch: int = 1
    seq: int = 128
    threads: int | None = None
    runs: int = 30
    kernels: str | None = None  # measured: None = each unit's kernel; "exact" / "fast" override every unit
    sample: Batch | None = None
    compress: Callable[[CompressionPlan], nn.Module] | None = None
    fits: Callable[[CompressionPlan], bool] | None = None


class LatencySource(ABC):
    """Prices the latency objective of plans for one search (one profile, one batch x seq shape).

    Contract of `price(adapter, plan)`:
    - `plan` is any valid plan for `adapter` (as sampled, not canonical); the source canonicalises it
      exactly once (`canonical_plan`: shared layers priced with their representative's specs, as
      `apply_plan` builds them) and prices the canonical plan; callers must not canonicalise first.
    - the result is milliseconds of one forward pass at `settings.batch` x `settings.seq`.
    - `estimate` and `calibrated` are deterministic, pure functions of (adapter, plan, profile, shape);
      `measured` times the exported model (noisy) but caches by canonical plan, so a plan seen again
      returns the same value.
    - what the trial records about the value is `LatencyEstimate.trial_attrs()`.
    """

    name: ClassVar[str] = ""  # the `latency.source` value it is registered under (registry.py)

    def __init__(self, settings: LatencySettings) -> None:
        self.settings = settings

    def price(self, adapter: ModelAdapter, plan: CompressionPlan) -> LatencyEstimate:
        """`plan`'s latency objective (canonicalised here, once; see the class docstring)."""
        return self.price_canonical(adapter, canonical_plan(adapter, plan))

    @abstractmethod
    def price_canonical(self, adapter: ModelAdapter, plan: CompressionPlan) -> LatencyEstimate:
        """Price a plan already in canonical form (only `price` calls this)."""
