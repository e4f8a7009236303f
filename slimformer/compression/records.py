"""Typed records that recipes carry about what happened to their weights after compression. Pure schema
(pydantic only), so the recipe schema needs nothing from the packages that produce the records."""

from __future__ import annotations

from typing import Any

from slimformer.schema import FrozenModel


class RecoveryRecord(FrozenModel):
    """What a recipe records about the recovery its model went through: settings and fidelity before/after
    (held-out data). Re-applying the recipe with `--recover` and the same settings reproduces it."""

    settings: dict[str, Any]
    steps: int
    seconds: float
    train_samples: int
    eval_samples: int
    before: dict[str, float]
    after: dict[str, float]
