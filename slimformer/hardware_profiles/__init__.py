"""Hardware profiles: one machine + runtime's measured numbers and the latency maths they feed.

profile.py: the schema (+ shipped profiles in profiles/). roofline.py: the forward pass as ops and the roofline
estimate; predict.py (+ residual.py): the calibrated onnxruntime kernel model. Making profiles: torch_rates.py
(torch roofline rates), calibrate.py (kernel micro-benchmarks in microbench.py, whole-model timing in
model_timing.py of the reference models in references.py, residual fitting in residual_fit.py), validate.py;
machine.py: this machine's identity. Nothing here imports evaluators/, search/ or the CLI.

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
    from slimformer.hardware_profiles.torch_rates import measure_profile

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
        from slimformer.hardware_profiles.torch_rates import measure_profile

        return measure_profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
