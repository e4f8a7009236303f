"""This machine's own calibrated profile, for `latency.source: auto`: a search prices the machine it runs on.

When the configured profile is a calibrated one made on another machine (CPU model, ISA flags, onnxruntime
version or thread count differ), `auto_profile` returns this machine's profile instead: a shipped profile made on
this machine's CPU when there is one, else the user's cached one when an earlier search made it, else one made now
by the quick calibration (`CalibrationGrid.quick()`, planned into 3 minutes) and cached, keyed by exactly those
four things. One line says which. The cache is `$SLIMFORMER_CACHE_DIR/profiles`, else
`$XDG_CACHE_HOME/slimformer/profiles`, else `~/.cache/slimformer/profiles`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from slimformer.errors import ConfigError, notice
from slimformer.hardware_profiles.calibrate import CalibrationGrid, calibrate
from slimformer.hardware_profiles.machine import cpu_info, default_name
from slimformer.hardware_profiles.profile import HardwareProfile, list_profiles, load_profile, save_profile

CACHE_ENV = "SLIMFORMER_CACHE_DIR"
# what `auto` calibrates with; tests set a tiny grid here (the calibration itself still runs, on real timing)
AUTO_GRID: CalibrationGrid = CalibrationGrid.quick()


def cache_dir() -> Path:
    """Where this machine's profiles are cached (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "profiles"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "slimformer" / "profiles"


@dataclass(frozen=True)
class MachineKey:
    """What a calibrated profile is valid for: CPU model, ISA flags, onnxruntime version, intra-op threads."""

    cpu: str
    isa_flags: tuple[str, ...]
    runtime_version: str
    threads: int

    @classmethod
    def here(cls, threads: int) -> MachineKey:
        import onnxruntime as ort

        cpu, isa = cpu_info()
        return cls(cpu, tuple(sorted(isa)), ort.__version__, threads)

    @classmethod
    def of(cls, profile: HardwareProfile) -> MachineKey:
        return cls(profile.cpu, tuple(sorted(profile.isa_flags)), profile.runtime_version, profile.threads)

    def file_name(self) -> str:
        """e.g. `amd-epyc-avx512-1t-ort1-32-3f9a0c1d.yaml`: readable, and a hash of the whole key."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        runtime = "ort" + "-".join(self.runtime_version.split(".")[:2])
        return f"{default_name(self.cpu, list(self.isa_flags), self.threads, runtime)}-{digest}.yaml"


def made_here(profile: HardwareProfile, threads: int) -> bool:
    """Whether `profile` is an onnxruntime profile of this CPU model, ISA flags, onnxruntime version and threads."""
    return profile.runtime == "onnxruntime" and MachineKey.of(profile) == MachineKey.here(threads)


def shipped_made_here(threads: int) -> HardwareProfile | None:
    """The first shipped calibrated profile (hardware_profiles/profiles/, by name) made on this CPU model, ISA
    flags, onnxruntime version and thread count, or None: a CPU we calibrated on needs no calibration."""
    for name in list_profiles():
        try:
            prof = load_profile(name)
        except ConfigError:  # pragma: no cover - shipped files are tested to load
            continue
        if prof.calibrated and made_here(prof, threads):
            return prof
    return None


def deploy_threads(profile: HardwareProfile, threads: int | None) -> int:
    """The intra-op threads latency is priced at: `latency.threads`, else the profile's, at most the CPUs here."""
    return max(1, min(threads or profile.threads, os.cpu_count() or 1))


def auto_profile(profile: HardwareProfile, threads: int | None, log: Callable[[str], None] | None = None,
                 grid: CalibrationGrid | None = None) -> HardwareProfile:
    """`profile` when it was calibrated here (or has no calibrated model: it prices a roofline, labelled so);
    else this machine's cached profile, else a new quick calibration, cached. Says which in one line (through
    `log`, else as a notice)."""
    n = deploy_threads(profile, threads)
    if not profile.calibrated or made_here(profile, n):
        return profile
    say = log or (lambda msg: notice(msg, stacklevel=3))
    shipped = shipped_made_here(n)
    if shipped is not None:
        say(f"latency: hardware profile {profile.name} was calibrated on {profile.cpu}; pricing with the shipped "
            f"profile {shipped.name}, calibrated on this machine's CPU ({shipped.cpu}, {n} thread(s))")
        return shipped
    key = MachineKey.here(n)
    path = cache_dir() / key.file_name()
    if path.is_file():
        try:
            cached = load_profile(path)
        except ConfigError:  # a damaged cache file is made again
            cached = None
        if cached is not None and cached.calibrated and made_here(cached, n):
            say(f"latency: hardware profile {profile.name} was calibrated on {profile.cpu}; pricing with this "
                f"machine's cached calibration {path} ({cached.created})")
            return cached
    g = grid or AUTO_GRID
    say(f"latency: hardware profile {profile.name} was calibrated on {profile.cpu}, not on this machine ({key.cpu}, "
        f"{n} thread(s), onnxruntime {key.runtime_version}); calibrating it once (quick, planned {g.seconds:.0f} s), "
        f"cached in {path}")
    local = calibrate(n, g, progress=False)
    save_profile(local, path)
    return local
