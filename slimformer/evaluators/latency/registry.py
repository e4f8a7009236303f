"""The latency sources by `latency.source` config value, and the rule that resolves `auto`.

`auto` is no source of its own: it resolves to `calibrated` when the profile has a calibrated latency model,
else to `estimate` (`resolved_source`); a search with `auto` first swaps a calibrated profile made on
another machine for this machine's own (hardware_profiles/local_profile.py: cached, else a quick
calibration). A source registers with `@register_latency_source("name")`.
"""

from __future__ import annotations

from collections.abc import Callable

from slimformer.errors import ConfigError
from slimformer.evaluators.latency.base import LatencySettings, LatencySource
from slimformer.hardware_profiles.machine import cpu_info
from slimformer.hardware_profiles.predict import LABEL as CALIBRATED_LABEL
from slimformer.hardware_profiles.predict import require_model
from slimformer.hardware_profiles.profile import HardwareProfile
from slimformer.hardware_profiles.roofline import LABEL as ESTIMATE_LABEL

AUTO = "auto"
_SOURCES: dict[str, type[LatencySource]] = {}


def register_latency_source(name: str) -> Callable[[type[LatencySource]], type[LatencySource]]:
    """Class decorator: make `cls` the source for `latency.source: <name>`."""

    def add(cls: type[LatencySource]) -> type[LatencySource]:
        if name in _SOURCES and _SOURCES[name] is not cls:
            raise ValueError(f"latency source {name!r} is registered twice ({_SOURCES[name].__name__}, {cls.__name__})")
        cls.name = name
        _SOURCES[name] = cls
        return cls

    return add


def latency_source_names() -> list[str]:
    """Every value `latency.source` accepts: `auto` and the registered sources, sorted."""
    return [AUTO, *sorted(_SOURCES)]


def resolved_source(source: str, profile: HardwareProfile) -> str:
    """What prices the latency objective: 'calibrated' (the profile's kernel model) or 'estimate' (roofline);
    `auto` means calibrated when the profile has a calibrated model. 'measured' passes through."""
    if source == "calibrated":
        require_model(profile)
        return "calibrated"
    if source == AUTO:
        return "calibrated" if profile.calibrated else "estimate"
    return source


def source_label(source: str, profile: HardwareProfile) -> str:
    """The label reports carry, e.g. 'calibrated (onnxruntime kernel model; profile X v2-...)'; a calibrated
    model from another CPU model says so: 'calibrated on <that CPU> (...)'."""
    kind = resolved_source(source, profile)
    base = {"calibrated": CALIBRATED_LABEL, "estimate": ESTIMATE_LABEL}.get(kind, kind)
    if kind == "calibrated" and profile.cpu and profile.cpu != cpu_info()[0]:
        base = base.replace("calibrated", f"calibrated on {profile.cpu}", 1)
    return f"{base}; profile {profile.name} {profile.version}"


def make_latency_source(source: str, settings: LatencySettings) -> LatencySource:
    """The source `latency.source: <source>` names (`auto` resolved against `settings.profile`)."""
    name = resolved_source(source, settings.profile)
    cls = _SOURCES.get(name)
    if cls is None:
        raise ConfigError(f"latency.source {source!r} is unknown; choose one of {latency_source_names()}")
    return cls(settings)
