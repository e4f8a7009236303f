"""Hardware profiles: the few measured numbers a latency estimate needs, stored as plain YAML.

A profile describes one machine *at one thread count with one runtime*: its fp32 GEMM rate, its memory
bandwidth and the fixed cost of dispatching a small op. `measure.py` produces them; shipped profiles
live in `profiles/*.yaml` and are loaded by name, any other profile by path. Files are read with
`yaml.safe_load` and written with `yaml.safe_dump`; nothing is ever pickled.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimformer.errors import ConfigError
from slimformer.fileio import atomic_write

SCHEMA_VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "amd-epyc-avx512-2t-torch"
_SUFFIXES = (".yaml", ".yml")


class HardwareProfile(BaseModel):
    """Measured characteristics of one machine at a fixed thread count and runtime.

    peak_gflops_fp32: best fp32 GEMM rate seen (GFLOP/s, 1e9) at `threads` threads.
    mem_bandwidth_gbs: best large-copy rate (GB/s, 1e9 bytes; bytes read + bytes written).
    per_op_overhead_us: median wall time of a tiny op (dispatch + allocation), microseconds.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str = Field(min_length=1)
    cpu: str
    cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    isa_flags: list[str] = Field(default_factory=list)
    runtime: str = "torch"
    runtime_version: str
    peak_gflops_fp32: float = Field(gt=0)
    mem_bandwidth_gbs: float = Field(gt=0)
    per_op_overhead_us: float = Field(ge=0)
    created: date
    notes: str = ""

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not supported (this slimformer reads {SCHEMA_VERSION})")
        return v


def list_profiles() -> list[str]:
    """Names of the shipped profiles (file stems in `hardware_profiles/profiles/`), sorted."""
    if not PROFILES_DIR.is_dir():
        return []
    return sorted(p.stem for p in PROFILES_DIR.iterdir() if p.suffix in _SUFFIXES and p.is_file())


def default_profile_name() -> str:
    """The shipped profile used when none is given."""
    return DEFAULT_PROFILE


def _shipped_path(name: str) -> Path | None:
    for suffix in _SUFFIXES:
        p = PROFILES_DIR / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _looks_like_path(s: str) -> bool:
    return s.endswith(_SUFFIXES) or "/" in s or os.sep in s or (os.altsep is not None and os.altsep in s)


def _describe_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif e["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']}")
    allowed = ", ".join(HardwareProfile.model_fields)
    return "; ".join(parts) + f" (allowed keys: {allowed})"


def _load_file(path: Path) -> HardwareProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read hardware profile {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"hardware profile {path} is not valid YAML: {detail}") from e
    if not isinstance(data, dict):
        raise ConfigError(
            f"hardware profile {path} must be a YAML mapping of keys to values (got {type(data).__name__})"
        )
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"hardware profile {path} is not valid: {_describe_validation(e)}") from e


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Load a shipped profile by name (see `list_profiles()`) or any profile YAML file by path."""
    s = os.fspath(name_or_path)
    if not _looks_like_path(s):
        shipped = _shipped_path(s)
        if shipped is not None:
            return _load_file(shipped)
    path = Path(s).expanduser()
    if path.is_file():
        return _load_file(path)
    if _looks_like_path(s):
        raise ConfigError(f"hardware profile file {s} does not exist; check the path")
    names = ", ".join(list_profiles()) or "(none)"
    raise ConfigError(
        f"unknown hardware profile {s!r}; shipped profiles: {names}; "
        "or pass a path to a profile YAML file (see `python -m slimformer.hardware_profiles.measure`)"
    )


def save_profile(profile: HardwareProfile, path: str | os.PathLike[str]) -> Path:
    """Write `profile` as plain YAML (atomically: temp file in the same folder, then rename)."""
    dest = Path(path).expanduser()
    atomic_write(dest, yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    return dest
