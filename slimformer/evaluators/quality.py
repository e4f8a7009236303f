"""Quality: fidelity of a compressed model to its uncompressed teacher on fixed data.

Encoders: mean cosine of pooled embeddings and top-10 neighbour agreement (do the same texts stay
each other's nearest neighbours?). Classifiers: top-1 agreement, KL(teacher || student) and accuracy
when labels exist. Teacher outputs are computed once per data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimformer.errors import ConfigError
from slimformer.models.base import Batch, ModelAdapter

ENCODER_METRICS = ("cosine", "neighbours")
CLASSIFIER_METRICS = ("agreement", "accuracy", "neg_kl")


@dataclass(frozen=True)
class QualityResult:
    """All fidelity numbers for one model on one data set; `value(name)` picks the objective."""

    metrics: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0

    def value(self, name: str) -> float:
        return self.metrics[name]


def neighbour_agreement(teacher: Tensor, student: Tensor, k: int = 10) -> float:
    """Mean overlap of each sample's k nearest neighbours (cosine) under teacher and student."""
    n = teacher.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def knn(e: Tensor) -> Tensor:
        e = F.normalize(e.to(torch.float64), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=-1).indices

    a, b = knn(teacher), knn(student)
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).to(torch.float64)
    return float((hits / k).mean())


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
        if self.adapter.kind == "encoder":
            return ENCODER_METRICS
        return CLASSIFIER_METRICS if self.has_labels else CLASSIFIER_METRICS[::2]

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
        if self.adapter.kind == "encoder":
            metrics = {
                "cosine": float(F.cosine_similarity(out, t, dim=-1).mean()),
                "neighbours": neighbour_agreement(t, out),
            }
        else:
            agreement = float((out.argmax(-1) == t.argmax(-1)).to(torch.float64).mean())
            kl = float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(t, -1), log_target=True,
                                reduction="batchmean"))
            metrics = {"agreement": agreement, "neg_kl": -kl}
            if self.has_labels:
                labels = torch.cat([b.labels for b in self.batches])[: out.shape[0]]  # type: ignore[misc]
                metrics["accuracy"] = float((out.argmax(-1) == labels).to(torch.float64).mean())
                metrics["teacher_accuracy"] = float((t.argmax(-1) == labels).to(torch.float64).mean())
        return QualityResult(metrics, int(t.shape[0]))
