"""The search-space declaration as written in YAML (validated, unknown keys rejected)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from slimformer.compression.embedding_tiers import parse_layout
from slimformer.compression.plan import DEFAULT_SMOOTH
from slimformer.errors import PlanError
from slimformer.models.base import ROLES
from slimformer.schema import FrozenModel

SparsityChoice = float | Literal["2:4"]


MAX_LAYER = 10_000  # upper bounds far above any model, so that no choice allocates or overflows absurdly
MAX_WIDTH = 1 << 24


class SelectConfig(FrozenModel):
    """Which units a group covers: all conditions must hold (an empty select covers every unit)."""

    role: list[str] | None = None
    layers: str | int | list[int] | None = None  # "0-3", "2", 2, or [0, 1]
    regex: str | None = None

    @field_validator("role")
    @classmethod
    def _roles(cls, v: list[str] | None) -> list[str] | None:
        bad = [r for r in v or [] if r not in ROLES]
        if bad:
            raise ValueError(f"unknown role(s) {bad}; roles are {list(ROLES)}")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex {v!r}: {exc}") from None
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | int | list[int] | None) -> str | int | list[int] | None:
        if isinstance(v, str):
            m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9}))?", v.strip())
            if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise ValueError(f"layers {v!r}: write a range like '0-3', one layer like '2', or a list")
            numbers = [int(g) for g in m.groups() if g is not None]
        else:
            numbers = [v] if isinstance(v, int) else list(v or [])
        if any(not 0 <= n <= MAX_LAYER for n in numbers):
            raise ValueError(f"layers {v!r}: layer numbers are 0..{MAX_LAYER}")
        return v

    def layer_set(self) -> set[int] | None:
        if self.layers is None:
            return None
        if isinstance(self.layers, int):
            return {self.layers}
        if isinstance(self.layers, list):
            return set(self.layers)
        lo, _, hi = self.layers.strip().partition("-")
        return set(range(int(lo), int(hi or lo) + 1))


class GroupConfig(FrozenModel):
    """Choices for the units a group selects. Each list is a categorical search dimension."""

    select: SelectConfig = SelectConfig()
    rank_fraction: list[float] = [1.0]
    sparsity: list[SparsityChoice] = [0.0]
    bits: list[Literal[32, 16, 8, 4, 3, 2]] = [32]  # 3 and 2: linear units only (all 2^b levels, signed scales)
    group_size: list[int | None] = [None]
    # rounding for integer bits: rtn, or data-aware (calibration Hessians): gptq, gptq-ao (act-order + damping
    # search), recon (gptq-ao codes + least-squares scales on calibration outputs); compression/reconstruct.py
    method: list[Literal["rtn", "gptq", "gptq-ao", "recon"]] = ["rtn"]
    # compute of 8/4-bit linears: exact (weight-only, fp32 matmul) or int8 (int8 GEMM, activations quantised);
    # ignored for other bits and for embedding tables, like group_size
    kernel: list[Literal["exact", "int8"]] = ["exact"]
    # SmoothQuant alpha of the group's int8-kernel units (factors from calibration activations, stored with the
    # unit: compression/smoothing.py); null: unsmoothed. Not a search dimension: one setting per group
    smooth: float | None = Field(DEFAULT_SMOOTH, ge=0, le=1, allow_inf_nan=False)
    # embedding tables only: per-row precision tiers by token frequency, each choice a layout such as
    # "int8:4000,int4/32:8000,int2/64" (tier[/group][:rows], the last tier the rest) or "none" (bits decide)
    tiers: list[str] = ["none"]
    heads_kept: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] | None = None
    # <= 1.0: fraction of the FFN width; > 1: absolute count
    neurons_kept: list[Annotated[float, Field(gt=0, le=MAX_WIDTH)]] | None = None
    per_layer: bool | None = None  # overrides the space-wide setting

    @field_validator("rank_fraction")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("rank_fraction choices must be in (0, 1]; 1.0 means full rank")
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: list[SparsityChoice]) -> list[SparsityChoice]:
        if not v or any(isinstance(s, float) and not 0 <= s < 1 for s in v):
            raise ValueError("sparsity choices must be in [0, 1) or the string '2:4'")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: list[int | None]) -> list[int | None]:
        if not v or any(g is not None and (g < 2 or g % 2 or g > MAX_WIDTH) for g in v):
            raise ValueError(f"group_size choices must be even numbers from 2 to {MAX_WIDTH}, or null for per-channel "
                             "scales")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("bits needs at least one choice (32, 16, 8, 4, 3 or 2)")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("tiers needs at least one choice (a layout such as 'int4/32:8000,int2/64', or none)")
        for layout in v:
            if layout != "none":
                try:
                    parse_layout(layout)
                except PlanError as exc:
                    raise ValueError(str(exc)) from None
        return v

    @field_validator("kernel")
    @classmethod
    def _kernel(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("kernel needs at least one choice (exact or int8)")
        return v


class StructureConfig(FrozenModel):
    """How this search's head/neuron pruning ranks and corrects (CompressionPlan.structure; recorded in recipes).

    A search always has calibration data, so the default is the data-driven ranking and the least-squares
    re-fit; `importance: weight, refit: false` is the former weight-norm behaviour.
    """

    importance: Literal["weight", "activation"] = "activation"
    refit: bool = True


class SpaceConfig(FrozenModel):
    """A search space: unit groups, per-layer or per-group choices, and sharing patterns."""

    groups: list[GroupConfig] = Field(min_length=1)
    per_layer: bool = True
    sharing: list[str] = ["none"]
    sharing_scope: list[Literal["attention", "ffn", "block"]] = ["attention"]
    data_aware_lowrank: bool = True
    # text the embedding tiers rank tokens on: null = this search's search + calibration text (never held-out),
    # or a named text source (slimformer.data.load_texts)
    tier_reference: str | None = None
    structure: StructureConfig = StructureConfig()

    @field_validator("sharing")
    @classmethod
    def _sharing(cls, v: list[str]) -> list[str]:
        for p in v:
            if p not in ("none", "pairs") and not re.fullmatch(r"cycle\d{1,4}", p):
                raise ValueError(f"sharing pattern {p!r}: use none, pairs or cycleK (e.g. cycle3)")
        return v

    @model_validator(mode="after")
    def _nonempty(self) -> SpaceConfig:
        if not self.sharing or not self.sharing_scope:
            raise ValueError("sharing and sharing_scope need at least one choice")
        return self
