"""SearchConfig: the whole search as one validated document (unknown keys are errors)."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from slimformer.errors import ConfigError
from slimformer.fileio import first_validation_error, yaml_mapping
from slimformer.recovery.config import RecoverStageConfig
from slimformer.schema import FrozenModel
from slimformer.spaces.config import SpaceConfig

OBJECTIVES = ("quality", "latency", "memory")
QUICKSTART_CONFIG = Path(__file__).resolve().parent.parent / "data" / "quickstart.yaml"


class DataConfig(FrozenModel):
    """Where evaluation data comes from and how it is split (search vs held-out)."""

    source: str = "fortunes"  # fortunes | fashion-mnist | path.txt | path.jsonl | hf:NAME[:CONFIG]:SPLIT:COLUMN
    search_samples: int = Field(128, ge=4)
    heldout_samples: int = Field(256, ge=4)
    calibration_samples: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0


class BudgetConfig(FrozenModel):
    """Hard memory budget: a percentage of the fp32 weights ('15%') or bytes ('12MB', '900KB', 12000000)."""

    memory: str | int

    @field_validator("memory")
    @classmethod
    def _parse(cls, v: str | int) -> str | int:
        if _parse_budget(v, 10**15) is None:
            raise ValueError(f"{v!r}: write a positive percentage of fp32 like '15%' or a size like '12MB'")
        return v

    def to_bytes(self, fp32_bytes: int) -> int:
        out = _parse_budget(self.memory, fp32_bytes)
        if out is None:
            raise ConfigError(f"budget.memory {self.memory!r}: write a percentage of fp32 like '15%' or a "
                              "size like '12MB'")
        return out


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
    population_size: int = Field(16, ge=2)
    seed: int | None = 0
    repair: bool = True


class LatencyConfig(FrozenModel):
    """How the latency objective is priced, at one batch size and sequence length.

    source: auto (the profile's calibrated model when it has one, else the roofline estimate) | estimate
    (roofline) | calibrated (the profile's fitted kernel model; an error when it has none) | measured (export
    each evaluated candidate to ONNX and time it with the bench protocol: slow, exact).
    """

    source: Literal["auto", "estimate", "calibrated", "measured"] = "auto"
    batch: int = Field(1, ge=1)
    seq: int = Field(128, ge=1)
    threads: int | None = Field(None, ge=1)  # deployment intra-op threads; differing from the profile's warns
    runs: int = Field(30, ge=1)  # measured: timed runs per candidate (median taken, IQR recorded)
    kernels: Literal["exact", "fast"] = "exact"  # measured: the ONNX kernels candidates are exported with


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
    min_observations: int = Field(8, ge=2)


class SearchConfig(FrozenModel):
    """Everything a search needs. Paths are relative to the working directory."""

    model: str
    data: DataConfig = DataConfig()
    space: SpaceConfig
    budget: BudgetConfig
    objectives: list[Literal["quality", "latency", "memory"]] = ["quality", "latency", "memory"]
    quality_metric: str | None = None  # cosine | neighbours (encoders); agreement | accuracy | neg_kl
    sampler: SamplerConfig = SamplerConfig()
    trials: int = Field(60, ge=1)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = None
    study_name: str = "slimformer"
    run_dir: str = "runs/search"
    hardware_profile: str = "amd-epyc-avx512-2t-torch"
    latency: LatencyConfig = LatencyConfig()
    multi_fidelity: MultiFidelityConfig = MultiFidelityConfig()
    baselines: bool = True
    start_points: Literal["sensitivity", "random", "none"] = "sensitivity"  # first generation (search/start.py)
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    recover: RecoverStageConfig | None = None  # distil the top-k Pareto plans after the trials (recover_stage.py)
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
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return cls.from_yaml(p.read_text(), source=str(p))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
