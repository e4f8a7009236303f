"""The one strict pydantic base of every YAML/JSON schema (configs, spaces, recipes, profiles): unknown
keys are errors, so a typo is a one-line message instead of a silently ignored setting."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are rejected (extra='forbid'); fields may be assigned (hardware profiles are filled in)."""

    model_config = ConfigDict(extra="forbid")


class FrozenModel(StrictModel):
    """A StrictModel whose instances are immutable and hashable (configs, search spaces, recipes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
