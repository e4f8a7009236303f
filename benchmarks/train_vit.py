"""Train a small timm VisionTransformer on Fashion-MNIST from scratch: a real teacher for ViT searches.

    python benchmarks/train_vit.py --out runs/vit-fmnist-teacher [--epochs 3] [--train-limit N]
                                   [--threads N] [--seed 0] [--packaged]

Data: the full Fashion-MNIST (60,000 train / 10,000 test images) from Debian's ``dataset-fashion-mnist``
package (IDX gzip files under ``/usr/share/datasets/fashion-mnist``) when it is installed, else the
packaged 2,000 / 1,000 image sample (``slimformer.data.load_fashion_mnist``; both loaders live in
``slimformer.data``, the architecture in ``slimformer.models.vit``). Training is AdamW with a
short linear warm-up and a cosine decay, batch 128, random crop (padding 2) and horizontal flip, and is
deterministic for a given seed and thread count (initialisation under ``torch.manual_seed``, shuffling
and augmentation from one seeded generator).

The output directory is a timm directory that ``slimformer.models.load`` reads (``config.json`` with the
architecture, model_args and the Fashion-MNIST normalisation in ``pretrained_cfg``, ``model.safetensors``),
plus ``train_info.json`` with the training record. It is written atomically (temp dir, then rename).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimformer.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FMNIST_MEAN,
    FMNIST_STD,
    load_full_fashion_mnist,
    read_idx,
)
from slimformer.errors import SlimformerError
from slimformer.models.vit import ARCHITECTURE, MODEL_ARGS, TimmViTAdapter, create_vit, save_timm_dir

__all__ = ["ARCHITECTURE", "DEBIAN_FASHION_MNIST_DIR", "FMNIST_MEAN", "FMNIST_STD", "MODEL_ARGS", "TRAIN_INFO",
           "TrainResult", "evaluate_accuracy", "load_full_fashion_mnist", "main", "read_idx",
           "train_fashion_mnist_vit"]

TRAIN_INFO = "train_info.json"


@dataclass(frozen=True)
class TrainResult:
    """What `train_fashion_mnist_vit` did: data sizes, accuracies, time, and where the model is."""

    out_dir: Path
    epochs: int
    train_size: int
    data_source: str  # "debian-full" or "packaged-sample"
    packaged_test_accuracy: float  # on the 1,000 packaged test images
    full_test_accuracy: float | None  # on the 10,000 test images, when the full dataset was available
    train_seconds: float  # the training loop only
    seconds: float  # everything: data, training, evaluation, saving
    seed: int
    threads: int
    torch_version: str
    epoch_seconds: list[float] = field(default_factory=list)
    final_train_loss: float = float("nan")

    @property
    def test_accuracy(self) -> float:
        """Accuracy on the largest test set evaluated (10,000 images when available, else 1,000)."""
        return self.packaged_test_accuracy if self.full_test_accuracy is None else self.full_test_accuracy


# -- data ------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip; x: (B, H, W) floats in [0, 1]."""
    b, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, :]
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


@torch.no_grad()
def evaluate_accuracy(adapter: TimmViTAdapter, images: np.ndarray, labels: np.ndarray,
                      batch_size: int = 500) -> float:
    """Top-1 accuracy of the adapter's model on uint8 images, through the adapter's own preprocessing."""
    model = adapter.model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(adapter.preprocess(images[i:i + batch_size]))
        correct += int((logits.argmax(-1) == torch.as_tensor(labels[i:i + batch_size])).sum())
    return correct / max(1, len(images))


def _lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


# -- training --------------------------------------------------------------------------------------
def train_fashion_mnist_vit(out_dir: Path, *, epochs: int = 3, train_limit: int | None = None, seed: int = 0,
                            threads: int | None = None, full_dataset: bool = True,
                            log: Callable[[str], Any] | None = print, model_args: dict[str, Any] | None = None,
                            batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                            warmup_fraction: float = 0.05, augment: bool = True,
                            data_root: Path = DEBIAN_FASHION_MNIST_DIR) -> TrainResult:
    """Train a small ViT on Fashion-MNIST from scratch and save it as a timm directory in `out_dir`.

    Args:
        out_dir: output directory; replaced if it holds an earlier training output, refused if it holds
            anything else.
        epochs: passes over the training images.
        train_limit: train on the first this-many training images only (None: all of them).
        seed: seed of the initialisation, the shuffle and the augmentation.
        threads: torch CPU threads while training (restored afterwards); None keeps torch's setting.
        full_dataset: use Debian's full dataset when installed (else, or when False, the packaged sample).
        log: progress messages (None: silent).
        model_args: timm VisionTransformer arguments; defaults to `MODEL_ARGS` (keys given here override).
        batch_size, lr, weight_decay, warmup_fraction, augment: optimisation settings.
        data_root: where the IDX gzip files are looked for.

    Returns:
        A `TrainResult`; the same numbers are written to ``out_dir/train_info.json``.
    """
    from slimformer.data import load_fashion_mnist

    say = log or (lambda msg: None)
    if epochs < 1:
        raise SlimformerError(f"epochs must be >= 1, got {epochs}")
    if train_limit is not None and train_limit < 1:
        raise SlimformerError(f"train_limit must be >= 1 or None, got {train_limit}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and
                                                      not (out_dir / TRAIN_INFO).exists())):
        raise SlimformerError(f"{out_dir} exists and is not a vit_train output; choose another --out")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        full_train = load_full_fashion_mnist("train", data_root) if full_dataset else None
        full_test = load_full_fashion_mnist("test", data_root) if full_dataset else None
        if full_train is not None and full_test is not None:
            (train_x, train_y), source = full_train, "debian-full"
        else:
            full_test = None
            (train_x, train_y), source = load_fashion_mnist("train"), "packaged-sample"
        if train_limit is not None:
            train_x, train_y = train_x[:train_limit], train_y[:train_limit]
        packaged_x, packaged_y = load_fashion_mnist("test")

        args = {**MODEL_ARGS, **(model_args or {})}
        torch.manual_seed(seed)
        adapter = create_vit(ARCHITECTURE, args, model_id=f"slimformer:fashion-mnist-vit-{ARCHITECTURE}")
        adapter.mean, adapter.std = (FMNIST_MEAN,), (FMNIST_STD,)
        model = adapter.model
        n_params = sum(p.numel() for p in model.parameters())
        n = len(train_x)
        steps_per_epoch = math.ceil(n / batch_size)
        total = epochs * steps_per_epoch
        say(f"training {ARCHITECTURE} {args} ({n_params / 1e6:.2f} M parameters) on {n} {source} images, "
            f"{epochs} epoch(s) of {steps_per_epoch} steps, {torch.get_num_threads()} thread(s)")

        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, round(warmup_fraction * total))))
        gen = torch.Generator().manual_seed(seed)
        images = torch.from_numpy(np.ascontiguousarray(train_x))
        labels = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
        epoch_seconds: list[float] = []
        loss_avg = float("nan")
        t_train = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            t_epoch = time.perf_counter()
            order = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                x = images[idx].to(torch.float32) / 255.0
                if augment:
                    x = _augment(x, gen)
                x = ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)
                y = labels[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(-1) == y).sum())
            epoch_seconds.append(time.perf_counter() - t_epoch)
            loss_avg = loss_sum / n
            say(f"epoch {epoch + 1}/{epochs}: loss {loss_avg:.4f}, train accuracy {correct / n:.4f}, "
                f"{epoch_seconds[-1]:.1f} s")
        train_seconds = time.perf_counter() - t_train
        model.eval()

        packaged_acc = evaluate_accuracy(adapter, packaged_x, packaged_y)
        full_acc = None if full_test is None else evaluate_accuracy(adapter, *full_test)
        say(f"test accuracy: {packaged_acc:.4f} on the {len(packaged_x)} packaged test images"
            + ("" if full_acc is None else f", {full_acc:.4f} on the {len(full_test[0])} test images"))
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)

    import timm

    info = {
        "architecture": ARCHITECTURE,
        "model_args": args,
        "parameters": n_params,
        "epochs": epochs,
        "train_size": n,
        "data_source": source,
        "packaged_test_size": int(len(packaged_x)),
        "packaged_test_accuracy": packaged_acc,
        "full_test_size": None if full_test is None else int(len(full_test[0])),
        "full_test_accuracy": full_acc,
        "final_train_loss": loss_avg,
        "train_seconds": round(train_seconds, 2),
        "epoch_seconds": [round(s, 2) for s in epoch_seconds],
        "seconds": None,  # filled below, after saving
        "seed": seed,
        "threads": used_threads,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                      "schedule": f"linear warm-up {warmup_fraction:.0%} + cosine", "grad_clip": 1.0,
                      "augment": "random crop (padding 2) + horizontal flip" if augment else "none"},
        "normalisation": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_timm_dir(adapter, tmp)
        info["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"saved {out_dir} ({info['seconds']:.1f} s in all)")
    return TrainResult(out_dir=out_dir, epochs=epochs, train_size=n, data_source=source,
                       packaged_test_accuracy=packaged_acc, full_test_accuracy=full_acc,
                       train_seconds=train_seconds, seconds=info["seconds"], seed=seed, threads=used_threads,
                       torch_version=torch.__version__, epoch_seconds=epoch_seconds, final_train_loss=loss_avg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/train_vit.py",
                                 description="Train a small timm ViT on Fashion-MNIST from scratch.")
    ap.add_argument("--out", required=True, type=Path, help="output directory (a timm model directory)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=None, help="train on the first N training images")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packaged", action="store_true",
                    help="train on the packaged 2,000-image sample even when the full dataset is installed")
    ns = ap.parse_args(argv)
    try:
        res = train_fashion_mnist_vit(ns.out, epochs=ns.epochs, train_limit=ns.train_limit, seed=ns.seed,
                                      threads=ns.threads, full_dataset=not ns.packaged)
    except SlimformerError as exc:
        ap.exit(2, f"error: {exc}\n")
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(res).items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
