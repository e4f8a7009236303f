"""The adapter contract: what slimformer needs to know about a model, independent of its library.

An adapter owns the uncompressed reference model (the teacher, never mutated), lists its compressible
units by role, describes its Transformer blocks (heads, FFN width, which modules a sharing scope covers),
and knows how to turn data into batches and a batch into the output that quality is measured on.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Role = Literal["query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out", "embedding"]
ROLES: tuple[str, ...] = ("query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out", "embedding")
ModelKind = Literal["encoder", "classifier"]


@dataclass(frozen=True)
class Unit:
    """One compressible weight matrix.

    shape is (out_features, in_features) for a linear layer and (num_embeddings, dim) for an embedding
    table, i.e. always the shape of its `.weight`.
    """

    name: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    has_bias: bool

    @property
    def kind(self) -> str:
        return "embedding" if self.role == "embedding" else "linear"

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1] + (self.shape[0] if self.has_bias else 0)


@dataclass(frozen=True)
class LayerInfo:
    """One Transformer block: its path, head geometry and the modules each sharing scope covers."""

    index: int
    path: str
    attention_path: str  # module holding the head count attribute
    heads_attr: str  # attribute name of the head count on that module
    num_heads: int
    head_dim: int
    intermediate: int
    qkv_units: tuple[str, ...]  # query, key, value (or one fused qkv)
    attn_out_unit: str
    ffn_in_unit: str
    ffn_out_unit: str
    attention_scope: tuple[str, ...]  # module paths shared under scope "attention"
    ffn_scope: tuple[str, ...]  # module paths shared under scope "ffn"


@dataclass
class Batch:
    """Model inputs on a device; `labels` when the data has them (classification accuracy)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        labels = None if self.labels is None else self.labels.to(device)
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, labels)


class ModelAdapter(ABC):
    """Base class of model adapters. Subclasses fill `units` and `layers` from the module structure."""

    kind: ModelKind
    family: str

    def __init__(self, model: nn.Module, model_id: str, source_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.model_id = model_id
        self.source_dir = source_dir
        self.units: list[Unit] = []
        self.layers: list[LayerInfo] = []
        self._sha256: str | None = None

    # -- structure -------------------------------------------------------------------------------
    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def fresh_model(self) -> nn.Module:
        """A deep copy of the reference model; every trial compresses its own copy."""
        return copy.deepcopy(self.model).eval()

    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer (names, shapes, bytes), computed once."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def total_parameters(self) -> int:
        seen: set[int] = set()
        n = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    # -- data --------------------------------------------------------------------------------------
    @abstractmethod
    def make_batches(self, samples: Sequence[Any], batch_size: int, labels: Sequence[int] | None = None
                     ) -> list[Batch]:
        """Tokenise / preprocess samples once into batches."""

    @abstractmethod
    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The tensor quality is measured on: pooled embeddings (encoder) or logits (classifier)."""

    # -- persistence -------------------------------------------------------------------------------
    @abstractmethod
    def save_base(self, out_dir: Path) -> None:
        """Write what is needed to rebuild the architecture without the original weights."""

    @classmethod
    @abstractmethod
    def skeleton(cls, out_dir: Path) -> ModelAdapter:
        """Rebuild an adapter from `save_base` output, with uninitialised (random) weights."""
