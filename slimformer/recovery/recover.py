"""`recover`: distil a compressed model from its uncompressed teacher with the compression structure fixed.

The student is the compressed model itself, made trainable in place (trainable.py: fake quantisation
with straight-through rounding, fixed masks, factors trained as factors, shared modules one object) and
frozen back at the end into the same formats, so memory and the packed file size do not change.
Training runs in eval mode (no dropout: the target is the teacher's deterministic function, so its outputs
for a training batch are computed once and reused every epoch, up to TEACHER_CACHE_BYTES), AdamW with
no weight decay (rows of the embedding table never seen in training must not shrink), a linear warm-up
then cosine decay over the budget, gradient clipping at 1.0, batches in a seeded order per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimformer.compression.records import RecoveryRecord
from slimformer.errors import ConfigError
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.models.base import Batch, ModelAdapter
from slimformer.recovery.config import RecoveryConfig
from slimformer.recovery.losses import Tapper, Taps, distill_loss
from slimformer.recovery.trainable import freeze_, make_trainable_


@dataclass
class RecoveryResult:
    """What one recovery did: steps, time, the loss per optimizer step and fidelity before/after
    (on `eval_batches`, when given)."""

    config: RecoveryConfig
    steps: int
    seconds: float
    train_samples: int
    losses: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    eval_samples: int = 0
    device: str = "cpu"

    def record(self) -> RecoveryRecord:
        """The typed summary a recipe stores."""
        settings = self.config.model_dump(mode="json", exclude_none=True)
        return RecoveryRecord(settings=settings, steps=self.steps, seconds=round(self.seconds, 1),
                              train_samples=self.train_samples, eval_samples=self.eval_samples,
                              before=self.before, after=self.after)


TEACHER_CACHE_BYTES = 2 << 30  # teacher outputs and taps kept per training batch up to this size (CPU or GPU memory)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("recovery device: cuda was requested but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def _lr_factor(progress: float, warmup: float) -> float:
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 0.02)
    rest = (progress - warmup) / max(1e-9, 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


def recover(teacher: ModelAdapter, model: nn.Module, train_batches: Sequence[Batch], config: RecoveryConfig,
            eval_batches: Sequence[Batch] | None = None, progress: bool = False,
            log: Callable[[str], Any] | None = None, evaluator: FidelityEvaluator | None = None) -> RecoveryResult:
    """Fine-tune the compressed `model` (in place) towards `teacher.model` on unlabeled `train_batches`.

    Returns a RecoveryResult; with `eval_batches` (held-out data, disjoint from the training batches) it
    carries the fidelity metrics before and after (or pass a ready `evaluator` of the teacher on held-out
    data). The teacher is never modified.
    """
    if not train_batches:
        raise ConfigError("recovery needs training data; got no batches")
    say = log or (lambda _msg: None)
    weights = config.loss_weights(teacher.kind)
    device = _device(config.device)
    if evaluator is None and eval_batches:
        evaluator = FidelityEvaluator(teacher, eval_batches, device=str(device))
    if evaluator is not None:
        say("recovery: scoring the model before distillation on the held-out samples")
    before = evaluator.evaluate(model).metrics if evaluator is not None else {}
    span = f"{config.step_budget} steps" if config.step_budget is not None else f"{config.minutes} min"
    say(f"recovery: distilling on {len(train_batches)} training batches on {device} ({span})")

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    t_model = teacher.model
    t_dev = next(t_model.parameters()).device
    t_model.to(device).eval()
    model.to(device).eval()
    state = make_trainable_(model, learn_scales=config.scale_lr > 0)
    groups: list[dict[str, Any]] = [{"params": state.weights, "lr": config.lr}]
    if state.scales:
        groups.append({"params": state.scales, "lr": config.scale_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    needs_taps = ("hidden" in weights, "relations" in weights)
    s_tap = Tapper(teacher, model, *needs_taps) if any(needs_taps) else None
    t_tap = Tapper(teacher, t_model, *needs_taps) if any(needs_taps) else None
    relation_pref = teacher.layers[-1].num_heads if teacher.layers else 1
    budget_steps = config.step_budget
    budget_s = None if config.minutes is None else 60.0 * config.minutes
    losses: list[float] = []
    terms: dict[str, list[float]] = {k: [] for k in weights}
    order: list[int] = []
    t_cache: dict[int, tuple[torch.Tensor, Taps | None]] = {}  # the teacher's targets per batch, reused each epoch
    cached_bytes = 0
    bar = None
    if progress:
        from slimformer.progress import progress_bar

        bar = progress_bar(budget_steps if budget_steps is not None else int(budget_s or 0), desc="recover",
                           unit="step" if budget_steps is not None else "s", leave=False)
    start = time.perf_counter()
    step = 0
    samples = 0
    try:
        while True:
            elapsed = time.perf_counter() - start
            if budget_steps is not None and step >= budget_steps:
                break
            if budget_s is not None and elapsed >= budget_s:
                break
            frac = step / budget_steps if budget_steps is not None else elapsed / budget_s  # type: ignore[operator]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(frac, config.warmup)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            step_terms = dict.fromkeys(weights, 0.0)
            for _ in range(config.grad_accum):
                if not order:
                    order = torch.randperm(len(train_batches), generator=gen).tolist()
                index = order.pop()
                batch = train_batches[index].to(device)
                samples += next(iter(batch.inputs.values())).shape[0]
                if index in t_cache:
                    t_out, t_taps = t_cache[index]
                else:
                    with torch.no_grad():
                        if t_tap is not None:
                            t_tap.taps.clear()
                        t_out = teacher.output(t_model, batch)
                    t_taps = None if t_tap is None else t_tap.taps.detached()
                    size = t_out.numel() * t_out.element_size() + (0 if t_taps is None else t_taps.nbytes())
                    if cached_bytes + size <= TEACHER_CACHE_BYTES:
                        t_cache[index], cached_bytes = (t_out, t_taps), cached_bytes + size
                if s_tap is not None:
                    s_tap.taps.clear()
                s_out = teacher.output(model, batch)
                loss, parts = distill_loss(weights, config.temperature, relation_pref, batch, s_out, t_out,
                                           None if s_tap is None else s_tap.taps, t_taps)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"recovery loss became {float(loss)} at step {step}; lower lr")
                (loss / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                for k, v in parts.items():
                    step_terms[k] += v / config.grad_accum
            torch.nn.utils.clip_grad_norm_(state.weights + state.scales, 1.0)
            opt.step()
            step += 1
            losses.append(step_loss)
            for k, v in step_terms.items():
                terms[k].append(v)
            if bar is not None:
                if budget_steps is not None:
                    bar.update(1)
                else:
                    bar.n = min(int(time.perf_counter() - start), bar.total)
                    bar.refresh()
                bar.set_postfix(loss=f"{step_loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.close()
        freeze_(model, state)
        t_model.to(t_dev)
    seconds = time.perf_counter() - start
    model.to("cpu" if device.type == "cuda" else device)
    say(f"recovered {step} steps in {seconds:.0f} s on {device}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses else "recovery ran no steps")
    after = evaluator.evaluate(model).metrics if evaluator is not None else {}
    n_eval = 0 if evaluator is None else int(evaluator.teacher_out.shape[0])
    return RecoveryResult(config, step, seconds, samples, losses, terms, before, after, n_eval, str(device))
