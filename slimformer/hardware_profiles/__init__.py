"""Hardware profiles: measured GEMM rate, memory bandwidth and op overhead of one machine + runtime.

`measure_profile` is imported lazily (it pulls in torch; loading a profile does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimformer.hardware_profiles.profile import (
    SCHEMA_VERSION,
    HardwareProfile,
    default_profile_name,
    list_profiles,
    load_profile,
    save_profile,
)

if TYPE_CHECKING:
    from slimformer.hardware_profiles.measure import measure_profile

__all__ = [
    "SCHEMA_VERSION",
    "HardwareProfile",
    "default_profile_name",
    "list_profiles",
    "load_profile",
    "measure_profile",
    "save_profile",
]


def __getattr__(name: str) -> Any:
    if name == "measure_profile":
        from slimformer.hardware_profiles.measure import measure_profile

        return measure_profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
