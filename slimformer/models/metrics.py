"""Fidelity metrics of a student's outputs against its teacher's: the pure maths each family's quality
metrics are made of (used by the search's evaluator and by the deployment benchmark alike).

Encoders: mean cosine of pooled embeddings and top-10 neighbour agreement (do the same samples stay each
other's nearest neighbours?). Classifiers: top-1 agreement, KL(teacher || student) and accuracy on labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ENCODER_METRICS: tuple[str, ...] = ("cosine", "neighbours")
CLASSIFIER_METRICS: tuple[str, ...] = ("agreement", "accuracy", "neg_kl")


def mean_cosine(teacher: Tensor, student: Tensor) -> float:
    """Mean cosine similarity of matching rows (pooled embeddings)."""
    return float(F.cosine_similarity(student, teacher, dim=-1).mean())


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


def top1_agreement(teacher: Tensor, student: Tensor) -> float:
    """Fraction of samples whose arg-max class is the same under teacher and student."""
    return float((student.argmax(-1) == teacher.argmax(-1)).to(torch.float64).mean())


def kl_divergence(teacher: Tensor, student: Tensor) -> float:
    """KL(teacher || student) of the softmax distributions, averaged over the batch."""
    return float(F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                          reduction="batchmean"))


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float((logits.argmax(-1) == labels).to(torch.float64).mean())


def encoder_metrics(teacher: Tensor, student: Tensor) -> dict[str, float]:
    """cosine and neighbours of pooled embeddings."""
    return {"cosine": mean_cosine(teacher, student), "neighbours": neighbour_agreement(teacher, student)}


def classifier_metrics(teacher: Tensor, student: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """agreement and neg_kl of logits; accuracy and teacher_accuracy when labels are given."""
    metrics = {"agreement": top1_agreement(teacher, student), "neg_kl": -kl_divergence(teacher, student)}
    if labels is not None:
        metrics["accuracy"] = accuracy(student, labels)
        metrics["teacher_accuracy"] = accuracy(teacher, labels)
    return metrics
