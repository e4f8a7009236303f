"""This machine's identity (CPU model, ISA flags) and how it differs from the machine a profile was made on."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable

from slimformer.errors import notice
from slimformer.hardware_profiles.profile import HardwareProfile

# ISA extensions worth recording (as spelled in /proc/cpuinfo); everything else is dropped.
_ISA_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "neon", "asimddp", "sve", "sve2", "i8mm", "bf16",
)

def cpu_info() -> tuple[str, list[str]]:
    """CPU model string and the ISA extensions of interest, from /proc/cpuinfo when it exists."""
    model = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not model:
        model = platform.processor() or platform.machine() or "unknown"
    return model, [f for f in _ISA_OF_INTEREST if f in flags]


def default_name(cpu: str, isa_flags: list[str], threads: int, runtime: str = "torch") -> str:
    """e.g. 'intel-xeon-platinum-8480-amx-8t-torch': cpu words, best vector ISA, thread count, runtime."""
    cleaned = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor)\b|\b\d+-core\b", " ", cpu, flags=re.IGNORECASE)
    words = re.findall(r"[a-z0-9]+", cleaned.lower())[:4] or [platform.machine().lower() or "cpu"]
    if "amx_tile" in isa_flags:
        isa = "amx"
    elif "avx512f" in isa_flags:
        isa = "avx512"
    elif "avx2" in isa_flags:
        isa = "avx2"
    elif "sve" in isa_flags:
        isa = "sve"
    elif "asimd" in isa_flags or "neon" in isa_flags:
        isa = "neon"
    else:
        isa = "generic"
    return "-".join([*words, isa, f"{threads}t", runtime])


def mismatch(profile: HardwareProfile, threads: int | None = None) -> str | None:
    """One line saying how this machine/runtime/thread count differs from the profile's, or None."""
    diffs = []
    cpu, isa = cpu_info()
    if profile.cpu and cpu != profile.cpu:
        diffs.append(f"CPU {cpu!r} (profile: {profile.cpu!r})")
    elif profile.isa_flags and sorted(isa) != sorted(profile.isa_flags):  # same model name, other extensions
        only_here, only_there = sorted(set(isa) - set(profile.isa_flags)), sorted(set(profile.isa_flags) - set(isa))
        diffs.append(f"ISA flags +{only_here or '[]'} -{only_there or '[]'} against the profile's")
    if profile.runtime == "onnxruntime":
        try:
            import onnxruntime as ort

            if ort.__version__ != profile.runtime_version:
                diffs.append(f"onnxruntime {ort.__version__} (profile: {profile.runtime_version})")
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            diffs.append("onnxruntime is not installed")
    if threads is not None and threads != profile.threads:
        diffs.append(f"{threads} thread(s) (profile: {profile.threads})")
    if profile.threads > (os.cpu_count() or 1):
        diffs.append(f"{os.cpu_count()} logical CPUs < the profile's {profile.threads} threads")
    if not diffs:
        return None
    return f"hardware profile {profile.name} was made elsewhere: this run has " + "; ".join(diffs) + \
        " - latency predictions may be off; calibrate here with `slimformer calibrate`"


def warn_if_mismatched(profile: HardwareProfile, threads: int | None = None,
                       log: Callable[[str], None] | None = None) -> str | None:
    """Say `mismatch` once, as one plain line: through `log` when given, else as a notice (a SlimformerWarning,
    which the CLI prints as one `warning:` line, no file:line). Returns the line, or None."""
    msg = mismatch(profile, threads)
    if msg:
        if log is not None:
            log(msg)
        else:
            notice(msg, stacklevel=2)
    return msg
