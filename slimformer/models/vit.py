"""`timm` Vision Transformers (the VisionTransformer family): fused qkv, proj, mlp.fc1/fc2 per block."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.models.base import Batch
from slimformer.models.discover import describe_model
from slimformer.models.modalities import ImageFamily
from slimformer.models.registry import register_family

ARCHITECTURE = "vit_tiny_patch16_224"
MODEL_ARGS: dict[str, Any] = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 96,
                              "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
"""The Fashion-MNIST teacher (benchmarks/train_vit.py): 16 patch tokens + class token, 4 blocks of width 96
(4 heads of 24), FFN 384; 0.45 M parameters, about 3 GFLOP per training step of 128 images."""


@register_family("timm")
class TimmViTAdapter(ImageFamily):
    """A timm VisionTransformer classifier; quality is measured on its logits."""

    kind = "classifier"
    ort_optimizer_type = "vit"

    @contextmanager
    def eager_attention(self, model: nn.Module) -> Iterator[None]:
        """timm's explicit attention (q @ k^T, softmax, @ v) instead of SDPA while active."""
        mods = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
        before = [m.fused_attn for m in mods]
        for m in mods:
            m.fused_attn = False
        try:
            yield
        finally:
            for m, b in zip(mods, before, strict=True):
                m.fused_attn = b

    def __init__(self, model: nn.Module, model_id: str, architecture: str, model_args: dict[str, Any],
                 source_dir: Path | None = None) -> None:
        super().__init__(model, model_id, source_dir)
        embed_dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
        if embed_dim is None or not hasattr(model, "patch_embed"):
            raise ModelLoadError(f"{model_id}: not a timm VisionTransformer (no patch_embed/embed_dim)")
        self.architecture = architecture
        self.model_args = dict(model_args)
        self.layers, self.units = describe_model(model, int(embed_dim))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
        self.in_chans = int(model.patch_embed.proj.in_channels)
        size = model.patch_embed.img_size
        self.img_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (size, size)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N,H,W) or (N,H,W,C) -> normalised float tensor at the model's size/channels."""
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] != self.in_chans:
            x = x.mean(1, keepdim=True).expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean[: self.in_chans] if len(self.mean) >= self.in_chans else
                            self.mean[:1] * self.in_chans).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.in_chans] if len(self.std) >= self.in_chans else
                           self.std[:1] * self.in_chans).view(1, -1, 1, 1)
        return (x - mean) / std

    def make_batches(self, samples: Sequence[Any], batch_size: int, labels: Sequence[int] | None = None
                     ) -> list[Batch]:
        images = np.asarray(samples)
        batches = []
        for i in range(0, len(images), batch_size):
            lab = None if labels is None else torch.as_tensor(np.asarray(labels[i:i + batch_size]),
                                                              dtype=torch.long)
            batches.append(Batch({"x": self.preprocess(images[i:i + batch_size])}, lab))
        return batches

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs["x"])

    @classmethod
    def detect(cls, local_dir: Path, config: Mapping[str, Any]) -> bool:
        """A timm directory: config.json names an `architecture` and is not a transformers config."""
        return "architecture" in config and "model_type" not in config

    @classmethod
    def handles_id(cls, model_id: str) -> bool:
        return model_id.startswith("timm:")

    @classmethod
    def from_dir(cls, local_dir: Path, model_id: str, max_length: int | None = None) -> TimmViTAdapter:
        return load_timm_dir(local_dir)

    @classmethod
    def from_id(cls, model_id: str, max_length: int | None = None) -> TimmViTAdapter:
        """`timm:ARCH`: timm's pretrained weights (downloaded from the hub, as timm does)."""
        return create_vit(model_id[5:], {}, pretrained=True)

    def save_base(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = {"architecture": self.architecture, "model_args": self.model_args,
               "num_classes": int(getattr(self.model, "num_classes", 0)),
               "pretrained_cfg": {"mean": list(self.mean), "std": list(self.std)}}
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        meta = {"family": self.family, "model_id": self.model_id, "kind": self.kind}
        (out_dir / "slimformer_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def skeleton(cls, out_dir: Path) -> TimmViTAdapter:
        return load_timm_dir(out_dir, weights=False)


def create_vit(architecture: str, model_args: dict[str, Any], model_id: str | None = None,
               pretrained: bool = False) -> TimmViTAdapter:
    """Create a timm ViT by name (pretrained=True downloads from the hub, as timm does)."""
    import timm

    try:
        model = timm.create_model(architecture, pretrained=pretrained, **model_args)
    except RuntimeError as exc:
        raise ModelLoadError(f"timm model {architecture!r}: {str(exc).splitlines()[0]}") from None
    return TimmViTAdapter(model, model_id or f"timm:{architecture}", architecture, model_args)


def load_timm_dir(model_dir: Path, weights: bool = True) -> TimmViTAdapter:
    """A timm directory: config.json with `architecture` (+ `model_args`) and model.safetensors."""
    cfg = json.loads((model_dir / "config.json").read_text())
    args = dict(cfg.get("model_args", {}))
    if "num_classes" in cfg:
        args.setdefault("num_classes", cfg["num_classes"])
    adapter = create_vit(cfg["architecture"], args, model_id=str(model_dir))
    if weights:
        from safetensors.torch import load_file

        wfile = model_dir / "model.safetensors"
        if not wfile.exists():
            raise ModelLoadError(f"{model_dir}: missing model.safetensors next to config.json")
        adapter.model.load_state_dict(load_file(wfile))
        adapter.source_dir = model_dir
    pc = cfg.get("pretrained_cfg", {})
    adapter.mean = tuple(pc.get("mean", adapter.mean))
    adapter.std = tuple(pc.get("std", adapter.std))
    return adapter


def save_timm_dir(adapter: TimmViTAdapter, out_dir: Path) -> None:
    """Save a timm ViT in the directory layout `load_timm_dir` reads."""
    from safetensors.torch import save_file

    adapter.save_base(out_dir)
    save_file({k: v.contiguous() for k, v in adapter.model.state_dict().items()}, out_dir / "model.safetensors")
