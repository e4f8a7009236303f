"""SearchConfig: the whole search as one validated document (unknown keys are errors)."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from slimformer.errors import ConfigError
from slimformer.fileio import first_validation_error, read_text_file, yaml_mapping
from slimformer.recovery.config import RecoverStageConfig, SearchRecoveryConfig
from slimformer.schema import FrozenModel
from slimformer.spaces.config import SpaceConfig
from slimformer.threads import MAX_THREADS

OBJECTIVES = ("quality", "latency", "memory")
# upper bounds: far above any real use, low enough that no value overflows a C integer or exhausts memory
MAX_SAMPLES = 1_000_000
MAX_BATCH = 4096
MAX_SEQ = 65536
MAX_SEED = 2**32 - 1
MAX_TRIALS = 10_000_000
QUICKSTART_CONFIG = Path(__file__).resolve().parent.parent / "data" / "quickstart.yaml"


class DataConfig(FrozenModel):
    """Where evaluation data comes from and how it is split (search vs held-out)."""

    source: str = "fortunes"  # fortunes | fashion-mnist | path.txt | path.jsonl | hf:NAME[:CONFIG]:SPLIT:COLUMN
    search_samples: int = Field(128, ge=4, le=MAX_SAMPLES)
    heldout_samples: int = Field(256, ge=4, le=MAX_SAMPLES)
    calibration_samples: int = Field(64, ge=1, le=MAX_SAMPLES)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    max_length: int = Field(128, ge=8, le=MAX_SEQ)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class BudgetConfig(FrozenModel):
    """Hard budgets. memory: a percentage of the fp32 weights ('15%') or bytes ('12MB', '900KB', 12000000).
    latency (optional): milliseconds of one forward pass at the `latency` shape ('8ms', '0.25s', '800us') or a
    multiple of the fp32 model's latency priced by the search's latency source ('0.5x')."""

    memory: str | int
    latency: str | None = None

    @field_validator("memory")
    @classmethod
    def _parse(cls, v: str | int) -> str | int:
        if _parse_budget(v, 10**15) is None:
            raise ValueError(f"{v!r}: write a positive percentage of fp32 like '15%' or a size like '12MB'")
        return v

    @field_validator("latency", mode="before")
    @classmethod
    def _parse_latency(cls, v: object) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or parse_latency_budget(v) is None:
            raise ValueError(f"{v!r}: {LATENCY_FORMS}")
        return v

    def latency_ms(self, fp32_ms: float | None = None) -> float | None:
        """The latency budget in ms (None without one); a relative budget ('0.5x') needs the fp32 model's
        latency `fp32_ms` from the search's latency source."""
        if self.latency is None:
            return None
        parsed = parse_latency_budget(self.latency)
        assert parsed is not None  # validated on construction
        value, relative = parsed
        if not relative:
            return value
        if fp32_ms is None:
            raise ValueError("a relative latency budget needs the fp32 model's latency")
        return value * fp32_ms

    @property
    def latency_is_relative(self) -> bool:
        parsed = None if self.latency is None else parse_latency_budget(self.latency)
        return parsed is not None and parsed[1]

    def to_bytes(self, fp32_bytes: int) -> int:
        out = _parse_budget(self.memory, fp32_bytes)
        if out is None:
            raise ConfigError(f"budget.memory {self.memory!r}: write a percentage of fp32 like '15%' or a "
                              "size like '12MB'")
        return out


LATENCY_FORMS = ("write a positive time like '8ms', '0.25s', '800us' or a multiple of the fp32 model's "
                 "latency like '0.5x'")
_LATENCY_UNITS = {"MS": 1.0, "S": 1000.0, "US": 1e-3}


def parse_latency_budget(v: str) -> tuple[float, bool] | None:
    """(amount, relative) of a latency budget: ms for '8ms'/'0.25s'/'800us', a factor for '0.5x'; None when
    malformed, zero, negative or without a unit."""
    s = v.strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(MS|S|US|X)", s)
    if not m:
        return None
    amount = float(m.group(1))
    if not (amount > 0 and math.isfinite(amount)):
        return None
    if m.group(2) == "X":
        return amount, True
    return amount * _LATENCY_UNITS[m.group(2)], False


_UNITS = {"B": 1, "": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def _parse_budget(v: str | int, fp32_bytes: int) -> int | None:
    """Exact bytes of a budget (Fraction arithmetic, so '29%' of 100 is 29), None when malformed."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v > 0 else None
    s = v.strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|B|KB|MB|GB|KIB|MIB|GIB)?", s)
    if not m:
        return None
    amount = Fraction(m.group(1))
    unit = m.group(2) or ""
    out = int(amount * fp32_bytes / 100) if unit == "%" else int(amount * _UNITS[unit])
    return out if out > 0 else None


class SamplerConfig(FrozenModel):
    """The Optuna sampler; repair: move over-budget proposals down to the budget before they are tried
    (search/repair.py)."""

    name: Literal["nsga2", "tpe", "random"] = "nsga2"
    population_size: int = Field(16, ge=2, le=MAX_SAMPLES)
    seed: int | None = Field(0, ge=0, le=MAX_SEED)
    repair: bool = True


class LatencyConfig(FrozenModel):
    """How the latency objective is priced, at one batch size and sequence length.

    source: auto (the profile's calibrated model when it has one, else the roofline estimate) | estimate
    (roofline) | calibrated (the profile's fitted kernel model; an error when it has none) | measured (export
    each evaluated candidate to ONNX and time it with the bench protocol: slow, exact).
    """

    source: Literal["auto", "estimate", "calibrated", "measured"] = "auto"
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    seq: int = Field(128, ge=1, le=MAX_SEQ)
    # deployment intra-op threads; differing from the profile's warns
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    runs: int = Field(30, ge=1, le=MAX_SAMPLES)  # measured: timed runs per candidate (median taken, IQR recorded)
    # measured: the ONNX kernels candidates are exported with; null = each unit's kernel (the space's `kernel`
    # choice), exact / fast = an override of every unit
    kernels: Literal["exact", "fast"] | None = None


class MultiFidelityConfig(FrozenModel):
    """Score each feasible plan on a leading slice of the search batches first and stop it (PRUNED) when even an
    optimistic full-data prediction is beaten by a finished plan with no more memory and latency
    (search/multifidelity.py).

    slice: fraction of the search batches (at least one batch); margin: standard deviations of the observed
    (full - slice) quality difference added to the prediction; min_observations: plans fully scored (with their
    slice) before anything is pruned.
    """

    enabled: bool = False
    slice: float = Field(0.25, gt=0, le=1)
    margin: float = Field(3.0, ge=0)
    min_observations: int = Field(8, ge=2, le=MAX_SAMPLES)


class SearchConfig(FrozenModel):
    """Everything a search needs. Paths are relative to the working directory."""

    model: str
    data: DataConfig = DataConfig()
    space: SpaceConfig
    budget: BudgetConfig
    objectives: list[Literal["quality", "latency", "memory"]] = ["quality", "latency", "memory"]
    quality_metric: str | None = None  # cosine | neighbours (encoders); agreement | accuracy | neg_kl
    sampler: SamplerConfig = SamplerConfig()
    trials: int = Field(60, ge=1, le=MAX_TRIALS)
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    storage: str | None = None
    study_name: str = "slimformer"
    run_dir: str = "runs/search"
    hardware_profile: str = "amd-epyc-avx512-2t-torch"
    latency: LatencyConfig = LatencyConfig()
    multi_fidelity: MultiFidelityConfig = MultiFidelityConfig()
    baselines: bool = True
    start_points: Literal["sensitivity", "random", "none"] = "sensitivity"  # first generation (search/start.py)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    recover: RecoverStageConfig | None = None  # distil the top-k Pareto plans after the trials (recover_stage.py)
    # distil the most promising structural plans and rank them by their recovered search-set score (recover_stage.py)
    recover_in_search: SearchRecoveryConfig | None = None
    deploy: Literal["onnx", "safetensors"] = "onnx"  # the artifact budget.memory applies to (compression/memory.py)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if "quality" not in v or len(set(v)) != len(v):
            raise ValueError("objectives must include quality, without repeats (e.g. [quality, latency, memory])")
        return v

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> SearchConfig:
        data = yaml_mapping(text, source, ConfigError, "a search config is a YAML mapping (model, space, budget, ...)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {first_validation_error(exc)}") from None

    @classmethod
    def load(cls, path: str | Path | None) -> SearchConfig:
        """Load a config file; None means the embedded Quickstart defaults."""
        p = QUICKSTART_CONFIG if path is None else Path(path)
        return cls.from_yaml(read_text_file(p, "config file", ConfigError), source=str(p))

    def to_yaml(self) -> str:
        """The config as YAML, with a storage URL's password masked (`user:***@host`): config.yaml in a run
        directory never holds a secret (the password comes from the environment, see search/storage.py)."""
        from slimformer.search.storage import hide_password

        data = self.model_dump(mode="json")
        if data.get("storage"):
            data["storage"] = hide_password(data["storage"])
        return yaml.safe_dump(data, sort_keys=False)
