"""Recovery settings: what `apply --recover` and the search's `recover:` key accept. Pure schema: no torch
here. (The record of a finished recovery that recipes carry is compression.records.RecoveryRecord.)"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from slimformer.errors import ConfigError
from slimformer.fileio import first_validation_error
from slimformer.schema import FrozenModel

LossName = Literal["cosine", "mse", "kl", "hidden", "relations"]
LOSS_NAMES: tuple[str, ...] = ("cosine", "mse", "kl", "hidden", "relations")
DEFAULT_LOSSES: dict[str, dict[str, float]] = {
    # encoders: the pooled embedding itself (cosine), every block's output, MiniLM-v2 Q/K/V relations (last block)
    "encoder": {"cosine": 1.0, "hidden": 1.0, "relations": 1.0},
    # classifiers (ViT): softened logits, every block's output
    "classifier": {"kl": 1.0, "hidden": 1.0},
    # causal LMs: next-token distributions at every position, every block's output
    "causal_lm": {"kl": 1.0, "hidden": 1.0},
}
DEFAULT_STEPS = 300
DEFAULT_SEARCH_STEPS = 200  # recover_in_search: a short distillation per plan
MAX_COUNT = 10_000_000  # bound on steps, batch sizes and sample counts: a typo is an error, not an overflow hours later


class RecoveryConfig(FrozenModel):
    """Knowledge-distillation recovery of a compressed model against its uncompressed teacher.

    Budget: `steps` optimizer steps or `minutes` of wall time (not both; neither means 300 steps). Only a
    `steps` budget is reproducible to the bit under a `seed` (a clock budget stops wherever the clock says).
    `losses` maps loss names to weights; None picks the defaults for the model kind (DEFAULT_LOSSES).
    """

    steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    minutes: float | None = Field(None, gt=0, allow_inf_nan=False)
    lr: float = Field(5e-4, gt=0, le=1.0)  # measured on MiniLM: 30 steps 0.817 -> 0.933 cosine (1e-4: 0.844 at 8)
    scale_lr: float = Field(1e-3, ge=0, le=1.0)  # quantisation scales (log-space); 0 keeps them fixed
    # measured on MiniLM at 12.3% of fp32, Debian fortunes, 480 steps: batch 32 0.9822 held-out cosine, batch 16
    # 0.9784 (and 0.9778 after 2251 steps: more steps of 16 do not make up for the noisier gradient)
    batch_size: int = Field(32, ge=1, le=65536)
    grad_accum: int = Field(1, ge=1, le=65536)
    warmup: float = Field(0.05, ge=0, lt=1)  # share of the budget with a linear learning-rate warm-up
    losses: dict[LossName, float] | None = None
    temperature: float = Field(2.0, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    data: str = "auto"  # auto (debian-fortunes if installed, else fortunes / fashion-mnist), texts; held-out excluded
    # at most this many training samples (None: all that are not held out)
    samples: int | None = Field(None, ge=1, le=MAX_COUNT)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> RecoveryConfig:
        if self.steps is not None and self.minutes is not None:
            raise ValueError("give steps or minutes, not both")
        if self.losses is not None:
            if not self.losses or any(w < 0 for w in self.losses.values()) or not any(self.losses.values()):
                raise ValueError("losses needs at least one positive weight and no negative ones, "
                                 "e.g. {cosine: 1.0, hidden: 1.0}")
        return self

    @classmethod
    def make(cls, source: str = "recovery", **values: Any) -> RecoveryConfig:
        """Validate keyword settings; bad values raise ConfigError with one line naming the field."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(f"{source}: {first_validation_error(exc)}") from None

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any] | None, source: str = "recovery", **given: Any) -> RecoveryConfig:
        """`make` on top of the settings a recipe recorded (RecoveryRecord.settings): the given (not None) values
        win; a given `steps` or `minutes` replaces the recorded budget of either kind."""
        base = {k: v for k, v in (recorded or {}).items() if k in cls.model_fields}
        if given.get("steps") is not None or given.get("minutes") is not None:
            base.pop("steps", None)
            base.pop("minutes", None)
        return cls.make(source, **{**base, **{k: v for k, v in given.items() if v is not None}})

    def loss_weights(self, kind: str) -> dict[str, float]:
        """The losses to use for a model kind ('encoder' or 'classifier'), zero weights dropped."""
        chosen = dict(self.losses) if self.losses is not None else DEFAULT_LOSSES[kind]
        if kind == "encoder" and "kl" in chosen and chosen["kl"] > 0:
            raise ConfigError("recovery losses: kl needs logits; an encoder outputs embeddings (use cosine or mse)")
        return {k: float(v) for k, v in chosen.items() if v > 0}

    def settings(self) -> dict[str, Any]:
        """The recovery settings alone (a subclass's stage keys such as `top_k` dropped), as recipes record them."""
        return RecoveryConfig.model_validate(
            {k: getattr(self, k) for k in RecoveryConfig.model_fields}).model_dump(mode="json", exclude_none=True)

    @property
    def step_budget(self) -> int | None:
        """Optimizer steps to run (None when the budget is wall time)."""
        if self.minutes is not None:
            return None
        return self.steps if self.steps is not None else DEFAULT_STEPS


class RecoverStageConfig(RecoveryConfig):
    """The search's optional `recover:` key: recover the `top_k` Pareto plans (by search-set quality) after
    the trials and re-score them on the held-out data."""

    top_k: int = Field(5, ge=1, le=MAX_COUNT)


class SearchRecoveryConfig(RecoveryConfig):
    """The search's optional `recover_in_search:` key: after the trials, distil the `top_k` most promising
    structural plans (pruned heads/neurons, low rank, sparsity, sharing) for `steps` on training data disjoint
    from the search and held-out sets, score them on the search set and add each as a trial with its recovered
    score (search/recover_stage.py), so that they compete on the front with quantisation-only plans.
    Defaults: 4 plans, 200 steps each (a `steps` budget, so that `apply --recover` reproduces the model)."""

    top_k: int = Field(4, ge=1, le=MAX_COUNT)

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("steps") is None and data.get("minutes") is None:
            return {**data, "steps": DEFAULT_SEARCH_STEPS}
        return data
