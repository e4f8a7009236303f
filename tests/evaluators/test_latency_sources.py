"""The latency-source registry: names, `auto` resolution, one canonicalisation per price, typed trial attrs."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest

from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec, sharing_pattern
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.errors import ConfigError
from slimformer.evaluators.latency import (
    CalibratedSource,
    LatencyEstimate,
    LatencySettings,
    MeasuredSource,
    MeasuredSpread,
    RooflineSource,
    latency_source_names,
    make_latency_source,
)
from slimformer.evaluators.latency import base as latency_base
from slimformer.hardware_profiles import load_profile
from slimformer.hardware_profiles.predict import predict
from slimformer.hardware_profiles.roofline import estimate_latency
from slimformer.models import load


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.tiny_model_dir(tmp_path_factory)


TORCH_PROFILE = "amd-epyc-avx512-2t-torch"  # roofline numbers only
CALIBRATED_PROFILE = "amd-epyc-avx512-1t-ort1-32"


def test_registry_names_and_unknown_source_lists_them() -> None:
    assert latency_source_names() == ["auto", "calibrated", "estimate", "measured"]
    with pytest.raises(ConfigError, match=r"unknown; choose one of \['auto', 'calibrated', 'estimate', 'measured'\]"):
        make_latency_source("psychic", LatencySettings(load_profile(TORCH_PROFILE)))


def test_auto_resolves_as_the_profile_allows() -> None:
    torch_prof, cal_prof = load_profile(TORCH_PROFILE), load_profile(CALIBRATED_PROFILE)
    assert isinstance(make_latency_source("auto", LatencySettings(torch_prof)), RooflineSource)
    assert isinstance(make_latency_source("auto", LatencySettings(cal_prof)), CalibratedSource)
    assert isinstance(make_latency_source("estimate", LatencySettings(cal_prof)), RooflineSource)
    with pytest.raises(ConfigError, match="no calibrated latency model"):
        make_latency_source("calibrated", LatencySettings(torch_prof))
    with pytest.raises(ConfigError, match="measured needs"):
        make_latency_source("measured", LatencySettings(torch_prof))


def _shared_plan(adapter) -> CompressionPlan:  # noqa: ANN001
    first = adapter.units[1].name
    return CompressionPlan(units={first: UnitSpec(bits=8)}, layers={1: LayerSpec(heads_kept=1)},
                           sharing=sharing_pattern("pairs", len(adapter.layers), "block"))


def test_sources_price_the_canonical_plan_once(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = load(str(tiny_model_dir), max_length=32)
    plan = _shared_plan(adapter)
    canon = canonical_plan(adapter, plan)
    calls: list[CompressionPlan] = []

    def counting(adapter, plan):  # noqa: ANN001, ANN202
        calls.append(plan)
        return canonical_plan(adapter, plan)

    monkeypatch.setattr(latency_base, "canonical_plan", counting)
    prof = load_profile(CALIBRATED_PROFILE)
    est = make_latency_source("estimate", LatencySettings(prof, batch=2, seq=16)).price(adapter, plan)
    assert est == LatencyEstimate(estimate_latency(adapter.units, adapter.layers, canon, prof, 2, 16).ms,
                                  "estimate", "estimate (roofline)")
    cal = make_latency_source("auto", LatencySettings(prof, batch=2, seq=16)).price(adapter, plan)
    assert cal.ms == predict(adapter, plan, 2, 16, prof).ms and cal.source == "calibrated"
    assert len(calls) == 2 and est.trial_attrs() == {} and cal.trial_attrs() == {}


def test_measured_over_budget_is_the_roofline_estimate(tiny_model_dir: Path) -> None:
    adapter = load(str(tiny_model_dir), max_length=32)
    prof = load_profile(TORCH_PROFILE)
    src = make_latency_source("measured", LatencySettings(
        prof, batch=1, seq=8, sample=adapter.make_batches(["a text"], 1)[0],
        compress=lambda plan: pytest.fail("an over-budget plan must not be built"), fits=lambda plan: False))
    assert isinstance(src, MeasuredSource)
    est = src.price(adapter, CompressionPlan())
    assert est.ms == estimate_latency(adapter.units, adapter.layers, CompressionPlan(), prof, 1, 8).ms
    assert est.trial_attrs() == {"latency_source": "estimate (over budget: not exported)"}


def test_measured_trial_attrs_keep_their_keys_and_order() -> None:
    est = LatencyEstimate(1.5, "measured", "measured (...)", recorded_source="measured",
                          spread=MeasuredSpread(0.1, 5, 1, "exact"))
    assert list(est.trial_attrs().items()) == [("latency_source", "measured"), ("latency_iqr_ms", 0.1),
                                              ("latency_runs", 5), ("latency_threads", 1),
                                              ("latency_kernels", "exact")]
