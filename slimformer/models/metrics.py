"""Fidelity metrics of a student's outputs against its teacher's: the pure maths each family's quality
metrics are made of (used by the search's evaluator and by the deployment benchmark alike).

Encoders: mean cosine of pooled embeddings and top-10 neighbour agreement (do the same samples stay each
other's nearest neighbours?). Classifiers: top-1 agreement, KL(teacher || student) and accuracy on labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ENCODER_METRICS: tuple[str, ...] = ("cosine", "neighbours")
CLASSIFIER_METRICS: tuple[str, ...] = ("agreement", "accuracy", "neg_kl")
CAUSAL_LM_METRICS: tuple[str, ...] = ("perplexity", "agreement", "neg_kl")
"""Causal LMs, per next-token position: `perplexity` = teacher ppl / student ppl on the actual next tokens
(higher is better, 1.0 = the teacher; needs the targets), top-1 agreement and -KL(teacher || student)."""


def format_quality(v: float) -> str:
    """A quality value for people: 4 decimals, or 4 significant digits when it is KL-sized (0 < |v| < 0.01), so
    `neg_kl` of near-lossless plans does not print as -0.0000."""
    return f"{v:.3e}" if 0 < abs(v) < 0.01 else f"{v:.4f}"


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


def causal_lm_metrics(teacher: Tensor, student: Tensor, targets: Tensor | None = None) -> dict[str, float]:
    """Next-token fidelity of (positions, vocab) logits: agreement, neg_kl / kl (mean per position) and, with
    the next-token ids, `perplexity` (teacher ppl / student ppl), `ppl_ratio` (student / teacher) and both
    perplexities."""
    kl = kl_divergence(teacher, student)
    metrics = {"agreement": top1_agreement(teacher, student), "neg_kl": -kl, "kl": kl}
    if targets is not None:
        nll_t = float(F.cross_entropy(teacher.to(torch.float64), targets))
        nll_s = float(F.cross_entropy(student.to(torch.float64), targets))
        ratio = math.exp(nll_s - nll_t)
        metrics.update(perplexity=1.0 / ratio, ppl_ratio=ratio, teacher_perplexity=math.exp(nll_t),
                       student_perplexity=math.exp(nll_s))
    return metrics
