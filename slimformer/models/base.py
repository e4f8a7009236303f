"""The adapter contract: what slimformer needs to know about a model, independent of its library.

An adapter owns the uncompressed reference model (the teacher, never mutated), lists its compressible
units by role, describes its Transformer blocks (heads, FFN width, which modules a sharing scope covers),
and knows how to turn data into batches and a batch into the output that quality is measured on.

An adapter class is a model *family* (registered with `models.registry.register_family`): everything that
differs between families - recognising a model directory or id, the default data and how samples are drawn,
the quality metrics, the ONNX export inputs and the latency shapes - is a method or attribute here, so the
rest of slimformer never branches on the family's name.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

import slimformer.models.metrics as M
from slimformer.errors import ModelLoadError

Role = Literal["query", "key", "value", "qkv", "attn_out", "ffn_gate", "ffn_in", "ffn_out", "embedding", "lm_head"]
ROLES: tuple[str, ...] = ("query", "key", "value", "qkv", "attn_out", "ffn_gate", "ffn_in", "ffn_out", "embedding",
                          "lm_head")
ModelKind = Literal["encoder", "classifier", "causal_lm"]


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
    kv_heads: int = 0  # key/value heads under grouped-query attention (0: as many as query heads)
    ffn_gate_unit: str | None = None  # SwiGLU gate (hidden -> intermediate), pruned with ffn_in's rows

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.kv_heads if self.kv_heads else 1


@dataclass
class Batch:
    """Model inputs on a device; `labels` when the data has them (classification accuracy)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        labels = None if self.labels is None else self.labels.to(device)
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, labels)


@dataclass(frozen=True)
class Samples:
    """Model inputs before batching (texts or images) and their labels when the data has them."""

    inputs: Sequence[Any]
    labels: Sequence[int] | None = None


@dataclass(frozen=True)
class EvalSamples:
    """A search's data: the search set, the held-out set (never used while searching) and calibration."""

    search: Samples
    heldout: Samples
    calibration: Samples


class ModelAdapter(ABC):
    """Base class of model adapters. Subclasses fill `units` and `layers` from the module structure.

    Family contract (class attributes and methods a registered family defines):
      family              registry name, written to slimformer_model.json and keying a profile's residual;
      detect / handles_id / from_dir / from_id / skeleton   recognise and build the family's models;
      default_data_source, eval_samples, heldout_samples, calibration_samples, recovery_*   its data;
      metric_names / default_quality_metric / fidelity_metrics   its quality metrics (by `kind`);
      has_sequence_axis, trace_batch, dynamic_axes, fixed_length_feed, fixed_shape_feed, latency_seqs,
      default_latency_shapes, default_latency_seq, doc_label   its export inputs and latency shapes.
    """

    kind: ModelKind
    family: ClassVar[str]
    catch_all: ClassVar[bool] = False
    """True for a family that accepts any directory no more specific family recognises (HF encoders)."""
    default_data_source: ClassVar[str]
    """The data source used when the user names none ('fortunes' texts, 'fashion-mnist' images)."""
    has_sequence_axis: ClassVar[bool]
    """True when 2-D inputs are (batch, sequence) token rows whose length is a latency shape dimension."""
    doc_label: ClassVar[str]
    """Short name of the input modality in benchmark documents ('text', 'vit')."""
    output_names: ClassVar[tuple[str, ...]] = ("output",)
    output_shares_embedding: bool = False
    """True when the output head multiplies by the input embedding table (tied LM head): one tensor, but the
    ONNX export reads it with a second kernel (a MatMul beside the Gather) when the table is compressed."""
    """Names of the exported ONNX graph's outputs (the family's default; `export_output_names` decides)."""
    ort_optimizer_type: ClassVar[str | None] = None
    """`onnxruntime.transformers.optimizer` model_type that fuses this family's eager-attention export (bench's
    optimised ORT baseline); None: the family has no such baseline."""

    def eager_attention(self, model: nn.Module) -> AbstractContextManager[None]:
        """While active, `model` computes attention with explicit matmuls/softmax (the graph onnxruntime's
        transformers optimizer recognises), not SDPA; restored afterwards. Default: unchanged."""
        return nullcontext()

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

    # -- deployed outputs (the exported ONNX graph computes exactly these) --------------------------
    def export_output_names(self) -> tuple[str, ...]:
        """Names of the exported graph's outputs, in the order of `export_outputs`; the first is the
        deployed result (what slimformer's bench and checks read)."""
        return self.output_names

    def export_outputs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        """What the deployed model returns: by default `output` alone."""
        return (self.output(model, batch),)

    def export_metadata(self) -> dict[str, str]:
        """Key/value pairs written into the exported graph's metadata_props (how its outputs are made)."""
        return {}

    # -- discovery (see models.registry) ------------------------------------------------------------
    @classmethod
    def detect(cls, local_dir: Path, config: Mapping[str, Any]) -> bool:
        """Whether `local_dir` (whose config.json parsed to `config`) holds a model of this family."""
        return False

    @classmethod
    def handles_id(cls, model_id: str) -> bool:
        """Whether this family builds `model_id` itself, without a local directory (e.g. `timm:ARCH`)."""
        return False

    @classmethod
    def from_dir(cls, local_dir: Path, model_id: str, max_length: int | None = None) -> ModelAdapter:
        """Load a model directory this family `detect`ed; `model_id` is the canonical id to record."""
        raise ModelLoadError(f"family {cls.family!r} does not load model directories")

    @classmethod
    def from_id(cls, model_id: str, max_length: int | None = None) -> ModelAdapter:
        """Build a model from an id this family `handles_id`."""
        raise ModelLoadError(f"family {cls.family!r} does not build models from ids ({model_id!r})")

    # -- data (what each family reads; sources are slimformer.data names) ----------------------------
    @abstractmethod
    def eval_samples(self, source: str, n_search: int, n_heldout: int, n_calibration: int, seed: int
                     ) -> EvalSamples:
        """A search's search, held-out and calibration samples from `source` (ConfigError if unusable)."""

    @abstractmethod
    def heldout_samples(self, source: str, n: int) -> Samples:
        """`n` held-out samples (never the search split) that fidelity is measured on outside a search."""

    @abstractmethod
    def calibration_samples(self, source: str, n: int) -> Sequence[Any]:
        """`n` calibration samples for data-aware transforms: the start of the search split."""

    @abstractmethod
    def recovery_exclusions(self, source: str, n: int) -> list[str]:
        """Samples recovery must not train on (the texts `heldout_samples` returns; [] when held-out data
        is a separate split, as for images)."""

    @abstractmethod
    def recovery_source(self, requested: str, search_source: str | None = None) -> str:
        """The recovery data source: `requested`, or for 'auto' this family's default (the search's own
        source when it is a user-supplied one and the family can train on it)."""

    @abstractmethod
    def recovery_samples(self, source: str, exclude: Iterable[str], limit: int | None, seed: int,
                         bucket: bool = True) -> Sequence[Any]:
        """Recovery training samples from `source`, none of `exclude`; with `bucket`, ordered so samples of
        similar size share a batch."""

    # -- quality -------------------------------------------------------------------------------------
    def metric_names(self, has_labels: bool) -> tuple[str, ...]:
        """Quality metrics of this model's output: cosine/neighbours of embeddings, or agreement/neg_kl
        (and accuracy when the data has labels) of logits."""
        if self.kind == "encoder":
            return M.ENCODER_METRICS
        return M.CLASSIFIER_METRICS if has_labels else M.CLASSIFIER_METRICS[::2]

    @property
    def default_quality_metric(self) -> str:
        """The search's quality objective when the config names none."""
        return "cosine" if self.kind == "encoder" else "agreement"

    def fidelity_metrics(self, teacher: torch.Tensor, student: torch.Tensor,
                         labels: torch.Tensor | None = None) -> dict[str, float]:
        """Every metric of `metric_names` for student outputs against teacher outputs (same rows)."""
        if self.kind == "encoder":
            return M.encoder_metrics(teacher, student)
        return M.classifier_metrics(teacher, student, labels)

    # -- export inputs and latency shapes ----------------------------------------------------------
    @abstractmethod
    def trace_batch(self) -> Batch:
        """A small batch to trace the ONNX graph with (padding / preprocessing included in the trace)."""

    def dynamic_axes(self, batch: Batch) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes of the inputs of `batch` and of the outputs: batch, and sequence for tokens."""
        axes = {k: ({0: "batch", 1: "sequence"} if self.has_sequence_axis and t.dim() == 2 else {0: "batch"})
                for k, t in batch.inputs.items()}
        for name in self.export_output_names():
            axes[name] = {0: "batch"}
        return axes

    @abstractmethod
    def fixed_length_feed(self, samples: Sequence[Any], batch: int, seq: int) -> dict[str, np.ndarray]:
        """ONNX inputs of `batch` samples (cycled if too few); texts padded/truncated to exactly `seq` tokens."""

    def fixed_shape_feed(self, batch: Batch, n: int, seq: int) -> dict[str, np.ndarray]:
        """Inputs of exactly `n` rows (rows of `batch` cycled) and, for token inputs, `seq` columns (cut, or
        zero-padded with the attention mask 0): latency depends on the shape, not on the words."""
        feed = {}
        for name, t in batch.inputs.items():
            a = t.detach().cpu().numpy()
            a = a[np.arange(n) % a.shape[0]]
            if self.has_sequence_axis and a.ndim == 2:
                out = np.zeros((n, seq), dtype=a.dtype)
                out[:, : min(seq, a.shape[1])] = a[:, :seq]
                a = out
            feed[name] = a
        return feed

    def latency_seqs(self, seqs: Sequence[int]) -> list[int]:
        """The sequence lengths latency is timed at: `seqs`, or [0] when inputs have no sequence axis."""
        return [int(s) for s in seqs] if self.has_sequence_axis else [0]

    @abstractmethod
    def default_latency_shapes(self) -> tuple[tuple[int, int], ...]:
        """(batch, seq) pairs this model's latency is calibrated at (seq: tokens incl. special ones)."""

    @property
    @abstractmethod
    def default_latency_seq(self) -> int:
        """The sequence length latency is validated at when the user gives none."""

    # -- persistence -------------------------------------------------------------------------------
    @abstractmethod
    def save_base(self, out_dir: Path) -> None:
        """Write what is needed to rebuild the architecture without the original weights."""

    def copy_source_files(self, out_dir: Path) -> None:
        """Copy files of `source_dir` a compressed directory must keep besides `save_base` (none by default)."""
        return None

    @classmethod
    @abstractmethod
    def skeleton(cls, out_dir: Path) -> ModelAdapter:
        """Rebuild an adapter from `save_base` output, with uninitialised (random) weights."""
