"""Quality: fidelity of a compressed model to its uncompressed teacher on fixed data.

Encoders: mean cosine of pooled embeddings and top-10 neighbour agreement (do the same texts stay
each other's nearest neighbours?). Classifiers: top-1 agreement, KL(teacher || student) and accuracy
when labels exist. The metrics are the model family's (`ModelAdapter.metric_names` / `fidelity_metrics`,
maths in `slimformer.models.metrics`). Teacher outputs are computed once per data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimformer.errors import ConfigError
from slimformer.models.base import Batch, ModelAdapter
from slimformer.models.metrics import CLASSIFIER_METRICS, ENCODER_METRICS, neighbour_agreement

__all__ = ["CLASSIFIER_METRICS", "ENCODER_METRICS", "FidelityEvaluator", "QualityResult", "neighbour_agreement"]


@dataclass(frozen=True)
class QualityResult:
    """All fidelity numbers for one model on one data set; `value(name)` picks the objective."""

    metrics: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0

    def value(self, name: str) -> float:
        return self.metrics[name]


class FidelityEvaluator:
    """Scores models against the adapter's reference model on fixed batches."""

    def __init__(self, adapter: ModelAdapter, batches: Sequence[Batch], device: str = "cpu") -> None:
        if not batches:
            raise ConfigError("evaluation data is empty; provide at least a few samples")
        self.adapter = adapter
        self.device = torch.device(device)
        self.batches = [b.to(self.device) for b in batches]
        self.has_labels = all(b.labels is not None for b in self.batches)
        teacher = adapter.model.to(self.device)
        self.teacher_out = self._run(teacher)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.adapter.metric_names(self.has_labels)

    @torch.no_grad()
    def _run(self, model: nn.Module, start: int = 0, stop: int | None = None) -> Tensor:
        model.eval()
        return torch.cat([self.adapter.output(model, b).to(torch.float32) for b in self.batches[start:stop]])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> QualityResult:
        return self.score(self.outputs(model))

    def outputs(self, model: nn.Module, start: int = 0, stop: int | None = None) -> Tensor:
        """The model's outputs on batches[start:stop] (multi-fidelity: a slice first, the rest if it goes on)."""
        return self._run(model.to(self.device), start, stop)

    @torch.no_grad()
    def score(self, out: Tensor) -> QualityResult:
        """Metrics of outputs for the first out.shape[0] samples (all batches, or a leading slice of them)."""
        t = self.teacher_out[: out.shape[0]]
        if not torch.isfinite(out).all():
            raise FloatingPointError("compressed model produced NaN/inf outputs")
        labels = None
        if self.has_labels:
            labels = torch.cat([b.labels for b in self.batches])[: out.shape[0]]  # type: ignore[misc]
        metrics = self.adapter.fidelity_metrics(t, out, labels)
        return QualityResult(metrics, int(t.shape[0]))
