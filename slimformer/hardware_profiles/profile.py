"""Hardware profiles: what one machine + runtime + thread count costs, stored as plain YAML.

A profile describes one machine *at one thread count with one runtime*. Schema v1 (torch `torch_rates.py`)
holds three roofline numbers: fp32 GEMM rate, memory bandwidth, per-op overhead. Schema v2 adds optional
sections written by `slimformer calibrate` (calibrate.py): caches, providers, peak rate per data type,
the fitted per-kernel-class latency model, the measured noise, how the calibration ran and validation
results. v1 files still load (they are read as v2 without the optional sections). Shipped profiles live
in `profiles/*.yaml` and are loaded by name, any other profile by path. Files are read with
`yaml.safe_load` and written with `yaml.safe_dump`; nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from slimformer.errors import ConfigError
from slimformer.fileio import MAX_DOCUMENT_BYTES, atomic_write, read_text_file, safe_load_yaml, yaml_problem
from slimformer.schema import StrictModel

SCHEMA_VERSION = 2
# Physical bounds a profile must satisfy before it is written (`physical_problems`): the numbers of one CPU
# core can be no better than this, whatever a noisy or defective calibration measured.
MIN_NODE_US = 0.05  # one onnxruntime node (dispatch + output): no kernel runs faster
MIN_CALL_US = 0.5  # one `session.run` from Python
MAX_GFLOPS_FP32_PER_THREAD = 400.0  # 2 AVX-512 FMA units x 32 fp32 FLOP x 6 GHz (with margin)
MAX_GFLOPS_INT_PER_THREAD = 8000.0  # AMX int8 (~2048 ops/cycle x 4 GHz); VNNI is 4x fp32
MAX_BANDWIDTH_GBS_PER_THREAD = 1000.0  # L1/L2-resident copies; DRAM is far below
SCALE_BOUNDS = (0.8, 1.6)  # a kernel family's in-graph scale in the whole-graph residual (residual.py)
LOCAL_SCALE_BOUNDS = (0.5, 2.0)  # a kernel group's in-graph scale in a shape-local residual (shape_residual.py)
READABLE_SCHEMAS = (1, 2)
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "amd-epyc-avx512-2t-torch"
_SUFFIXES = (".yaml", ".yml")


class Fit(StrictModel):
    """A linear model t_us = sum(coef[i] * feature_i) fitted by non-negative least squares.

    features name the inputs (see predict.py); rmse_rel is the fit's relative RMS error; n the samples.
    """

    features: list[str]
    coef: list[float]
    rmse_rel: float = 0.0
    n: int = 0


class KernelTable(StrictModel):
    """One linear kernel class (e.g. `matmulnbits:4:32`), piecewise in M = batch x seq tokens.

    times[i][a][b]: measured µs at M = m_values[i], K = dims[a], N = dims[b], made non-decreasing along
    K and N (running maximum), interpolated bilinearly in (K, N) inside the grid and scaled by K*N/(K'*N')
    from the nearest edge outside it; between M grid points linear in M (never decreasing), beyond the
    last one along the last segment. fits[i]: the least-squares summary t = c0 + c1*K*N + c2*K + c3*N at
    m_values[i] (its rmse_rel says how far a global roofline-shaped model is from the table).
    """

    m_values: list[int]
    fits: list[Fit]
    dims: list[int] = Field(default_factory=list)
    times: list[list[list[float]]] = Field(default_factory=list)


class Residual(StrictModel):
    """Whole-graph correction for one model family, fitted on full exported reference models (residual.py):
    ms = sum over kernel families f of class_scale[f] (default `scale`) * kernel ms of f
       + sum over layers of (per_layer_ms + tokens * (per_layer_token_us + kept-head share *
         per_layer_head_token_us) / 1000 + kept heads * batch * seq^2 * per_score_ns / 1e6) + const_ms
    (in-graph vs micro-benchmark kernel speed, glue reshapes/transposes/masks, dispatch, cache effects)."""

    scale: float = 1.0
    class_scale: dict[str, float] = Field(default_factory=dict)
    per_layer_ms: float = 0.0
    per_layer_token_us: float = 0.0
    per_layer_head_token_us: float = 0.0
    per_score_ns: float = 0.0  # per attention score (kept heads x batch x seq^2, summed over layers)
    const_ms: float = 0.0
    fitted_on: list[str] = Field(default_factory=list)
    rmse_rel: float = 0.0


class ShapeResidual(StrictModel):
    """Whole-graph correction for one model family at one (batch, seq) shape (shape_residual.py), fitted at
    calibration on the reference plans and a few sampled plans timed at that shape (few-shot, HELP-style):
    ms = sum over kernel groups g of scale[g] * kernel ms of g + const_ms + per_head_ms * kept heads (all layers).
    Groups missing from `scale` keep 1. pass_spread: median relative spread of the plans' pass medians."""

    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    scale: dict[str, float] = Field(default_factory=dict)
    const_ms: float = 0.0
    per_head_ms: float = 0.0
    fitted_on: list[str] = Field(default_factory=list)
    rmse_rel: float = 0.0
    pass_spread: float = 0.0


class LatencyModel(StrictModel):
    """The calibrated latency model: per-kernel-class tables and fits, overheads and residuals (`residual`: one
    per model family over all shapes; `local_residual`: per family, one per calibrated shape, preferred at it)."""

    linear: dict[str, KernelTable] = Field(default_factory=dict)
    embedding: dict[str, Fit] = Field(default_factory=dict)
    attention: Fit | None = None  # the attention core as torch's decomposition (MatMul, Softmax, NaN guard...)
    # the core as slimformer's export lowers it (com.microsoft.MultiHeadAttention); None in profiles calibrated
    # before it existed: those price the fused core with `attention` (measured at most that slow, see predict.py)
    attention_mha: Fit | None = None
    elementwise: dict[str, Fit] = Field(default_factory=dict)
    call_overhead_us: float = 0.0
    residual: dict[str, Residual] = Field(default_factory=dict)
    local_residual: dict[str, list[ShapeResidual]] = Field(default_factory=dict)
    flops_ms_per_gflop: float = 0.0  # the FLOPs proxy's single constant (fitted on the reference models)


class Noise(StrictModel):
    """Run-to-run noise: relative spread of repeated timings of the same graph during calibration."""

    median_rel_iqr: float
    p95_rel_iqr: float
    repeats: int
    loadavg: list[float] = Field(default_factory=list)
    # between passes (sampling.py): robust relative spread of a cell's pass medians, outlier passes measured
    # again, and how far the per-call overhead moved between chunks ((max - min) / median)
    median_pass_rel_sd: float | None = None
    p95_pass_rel_sd: float | None = None
    remeasured_passes: int | None = None
    call_overhead_drift: float | None = None


class CalibrationInfo(StrictModel):
    """How the latency model was made: command, duration, grid size, load average before/after."""

    command: str
    seconds: float
    measurements: int
    clock: str = "wall"  # thread_cpu: this thread's CPU time (1 thread; leaves out preemption) | wall
    quick: bool = False
    loadavg_before: list[float] = Field(default_factory=list)
    loadavg_after: list[float] = Field(default_factory=list)
    budget_seconds: float | None = None  # the wall-clock budget the run was planned into
    planned_seconds: float | None = None  # the micro-benchmarks' plan (cells x passes x runs)
    micro_seconds: float | None = None  # what the micro-benchmarks took


class ValidationResult(StrictModel):
    """Held-out accuracy of the latency model on one model (see validate.py); errors are relative."""

    model: str
    batch: int
    seq: int
    configs: int
    mape: float
    within_5: float
    within_10: float
    p95_error: float
    kendall_tau: float
    noise_floor: float
    flops_mape: float
    flops_within_10: float
    flops_kendall_tau: float
    estimate_mape: float | None = None  # the uncalibrated roofline estimate (same profile), unscaled
    estimate_kendall_tau: float | None = None
    roofline_fraction_median: float = 0.0
    date: str = ""
    loadavg: list[float] = Field(default_factory=list)
    fingerprint: str = ""


class HardwareProfile(StrictModel):
    """Measured characteristics of one machine at a fixed thread count and runtime.

    peak_gflops_fp32: best fp32 GEMM rate seen (GFLOP/s, 1e9) at `threads` threads.
    mem_bandwidth_gbs: best large-copy rate (GB/s, 1e9 bytes; bytes read + bytes written).
    per_op_overhead_us: median wall time of a tiny op (dispatch + allocation), microseconds.
    v2 sections (all optional): providers, caches (bytes by level), peak_gflops (by kernel class),
    latency_model (calibrated), noise, calibration, validation.
    """

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
    providers: list[str] = Field(default_factory=list)
    caches: dict[str, int] = Field(default_factory=dict)
    peak_gflops: dict[str, float] = Field(default_factory=dict)
    latency_model: LatencyModel | None = None
    noise: Noise | None = None
    calibration: CalibrationInfo | None = None
    validation: list[ValidationResult] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v not in READABLE_SCHEMAS:
            raise ValueError(f"schema_version {v} is not supported (this slimformer reads {READABLE_SCHEMAS})")
        return SCHEMA_VERSION  # v1 documents are v2 documents without the optional sections

    @property
    def calibrated(self) -> bool:
        """Whether the profile carries a calibrated latency model (else only the roofline numbers)."""
        return self.latency_model is not None and bool(self.latency_model.linear)

    def physical_problems(self) -> list[str]:
        """Every field whose value no real machine can have (empty for a physical profile): overheads below
        one node's dispatch, rates above a core's peak, negative or non-monotone kernel times, negative fit
        coefficients, residual scales outside their bounds. Rate bounds apply to CPU providers only."""
        out: list[str] = []
        t = self.threads
        cpu = not any("CUDA" in p or "ROCM" in p for p in self.providers)
        if self.per_op_overhead_us < MIN_NODE_US:
            out.append(f"per_op_overhead_us = {self.per_op_overhead_us} µs is below one node's {MIN_NODE_US} µs")
        if cpu and self.peak_gflops_fp32 > MAX_GFLOPS_FP32_PER_THREAD * t:
            out.append(f"peak_gflops_fp32 = {self.peak_gflops_fp32} is above {MAX_GFLOPS_FP32_PER_THREAD:.0f} "
                       f"GFLOP/s x {t} thread(s)")
        if cpu and self.mem_bandwidth_gbs > MAX_BANDWIDTH_GBS_PER_THREAD * t:
            out.append(f"mem_bandwidth_gbs = {self.mem_bandwidth_gbs} is above {MAX_BANDWIDTH_GBS_PER_THREAD:.0f} "
                       f"GB/s x {t} thread(s)")
        for cls, v in self.peak_gflops.items():
            bound = (MAX_GFLOPS_FP32_PER_THREAD if cls == "matmul" else MAX_GFLOPS_INT_PER_THREAD) * t
            if cpu and v > bound:
                out.append(f"peak_gflops[{cls}] = {v} is above {bound:.0f} GFLOP/s")
        if self.noise is not None and not 0 <= self.noise.median_rel_iqr <= 1:
            out.append(f"noise.median_rel_iqr = {self.noise.median_rel_iqr} is not in [0, 1]")
        if self.latency_model is not None:
            out += _model_problems(self.latency_model, t if cpu else None)
        return out

    def check_physical(self, where: str) -> None:
        """ConfigError naming the first unphysical field (and how many more) when `physical_problems` finds any."""
        bad = self.physical_problems()
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ConfigError(f"{where}: unphysical hardware profile {self.name}: {bad[0]}{more}; nothing written - "
                              "calibrate again with `slimformer calibrate` (the measurements were disturbed)")

    @property
    def fingerprint(self) -> str:
        """12 hex digits identifying what prices plans: the machine numbers and the fitted model
        (not notes or validation), so recipes can record exactly which calibration priced them."""
        keys = ("name", "cpu", "threads", "runtime", "runtime_version", "peak_gflops_fp32", "mem_bandwidth_gbs",
                "per_op_overhead_us", "latency_model")
        data = self.model_dump(mode="json", include=set(keys))
        lm = data.get("latency_model") or {}
        for optional in ("local_residual", "attention_mha"):  # profiles made before these keep their fingerprint
            if optional in lm and not lm[optional]:
                lm.pop(optional)
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def version(self) -> str:
        """`schema v2, created date, fingerprint` as one string (what recipes record)."""
        return f"v{self.schema_version}-{self.created.isoformat()}-{self.fingerprint}"


def _model_problems(lm: LatencyModel, threads: int | None) -> list[str]:
    """`physical_problems` of the latency model; `threads` None skips the CPU rate bound."""
    import math

    out: list[str] = []
    if lm.call_overhead_us < MIN_CALL_US:
        out.append(f"latency_model.call_overhead_us = {lm.call_overhead_us} µs is below {MIN_CALL_US} µs")
    fits = [(f"linear[{c}].fits[{i}]", f) for c, tab in lm.linear.items() for i, f in enumerate(tab.fits)]
    fits += [(f"embedding[{c}]", f) for c, f in lm.embedding.items()]
    fits += [(f"elementwise[{c}]", f) for c, f in lm.elementwise.items()]
    fits += [("attention", lm.attention)] if lm.attention is not None else []
    fits += [("attention_mha", lm.attention_mha)] if lm.attention_mha is not None else []
    for name, f in fits:
        if any(not math.isfinite(c) or c < 0 for c in f.coef):
            out.append(f"latency_model.{name}.coef = {f.coef} has a negative or non-finite coefficient")
    for name, f in lm.elementwise.items():
        if f.coef and f.coef[0] + sum(f.coef[1:]) < MIN_NODE_US:
            out.append(f"latency_model.elementwise[{name}] prices one element at {f.coef[0]:.4f} µs, below one "
                       f"node's {MIN_NODE_US} µs")
    for cls, tab in lm.linear.items():
        if not tab.times:
            continue
        a = np.array(tab.times, dtype=float)
        field = f"latency_model.linear[{cls}].times"
        if not np.isfinite(a).all() or a.min() < MIN_NODE_US:
            out.append(f"{field} has a time of {np.nanmin(a):.4f} µs, below one node's {MIN_NODE_US} µs")
            continue
        if (np.diff(a, axis=0) < -1e-9).any() or (np.diff(a, axis=1) < -1e-9).any() or \
                (np.diff(a, axis=2) < -1e-9).any():
            out.append(f"{field} is not non-decreasing in M, K and N")
        if threads is not None and len(tab.dims) == a.shape[1]:
            d = np.array(tab.dims, float)
            work = 2.0 * np.array(tab.m_values, float)[:, None, None] * d[None, :, None] * d[None, None, :]
            rate = float((work / a / 1e3).max())
            bound = (MAX_GFLOPS_FP32_PER_THREAD if cls == "matmul" else MAX_GFLOPS_INT_PER_THREAD) * threads
            if rate > bound:
                out.append(f"{field} implies {rate:.0f} GFLOP/s, above {bound:.0f} GFLOP/s")
    for fam, r in lm.residual.items():
        for k, v in r.class_scale.items():
            if not SCALE_BOUNDS[0] - 1e-6 <= v <= SCALE_BOUNDS[1] + 1e-6:
                out.append(f"latency_model.residual[{fam}].class_scale[{k}] = {v} is outside {SCALE_BOUNDS}")
        glue = (r.per_layer_ms, r.per_layer_token_us, r.per_layer_head_token_us, r.per_score_ns, r.const_ms)
        if any(not math.isfinite(g) or g < 0 for g in glue):
            out.append(f"latency_model.residual[{fam}] has a negative or non-finite glue term")
    for fam, shapes in lm.local_residual.items():
        for r in shapes:
            where = f"latency_model.local_residual[{fam}][{r.batch}x{r.seq}]"
            for k, v in r.scale.items():
                if not (math.isfinite(v) and LOCAL_SCALE_BOUNDS[0] - 1e-6 <= v <= LOCAL_SCALE_BOUNDS[1] + 1e-6):
                    out.append(f"{where}.scale[{k}] = {v} is outside {LOCAL_SCALE_BOUNDS}")
            if any(not math.isfinite(g) or g < 0 for g in (r.const_ms, r.per_head_ms)):
                out.append(f"{where} has a negative or non-finite const_ms or per_head_ms")
    return out


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
    text = read_text_file(path, "hardware profile", ConfigError, max_bytes=10 * MAX_DOCUMENT_BYTES)
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"hardware profile {path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"hardware profile {path} must be a YAML mapping of keys to values (got {type(data).__name__})"
        )
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"hardware profile {path} is not valid: {_describe_validation(e)}") from e


def resolve_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file a profile name (shipped) or path refers to; ConfigError when there is none."""
    s = os.fspath(name_or_path)
    if not _looks_like_path(s):
        shipped = _shipped_path(s)
        if shipped is not None:
            return shipped
    path = Path(s).expanduser()
    if path.is_file():
        return path
    raise ConfigError(f"hardware profile {s!r} is neither a shipped profile ({', '.join(list_profiles())}) nor a file")


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
        "or pass a path to a profile YAML file (see `python -m slimformer.hardware_profiles.torch_rates`)"
    )


def save_profile(profile: HardwareProfile, path: str | os.PathLike[str]) -> Path:
    """Write `profile` as plain YAML (atomically: temp file in the same folder, then rename); a profile with
    unphysical values (`HardwareProfile.physical_problems`) is a ConfigError naming the field, nothing written."""
    dest = Path(path).expanduser()
    profile.check_physical(str(dest))
    data = profile.model_dump(mode="json", exclude_none=True)
    atomic_write(dest, yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
    return dest
