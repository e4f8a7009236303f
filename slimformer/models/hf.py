"""Hugging Face `transformers` encoders (BERT, RoBERTa, DistilBERT, MiniLM, MPNet...) and
sentence-transformers checkpoints (their pooling config decides the embedding)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.fileio import read_json
from slimformer.models.base import Batch, Unit
from slimformer.models.discover import describe_model
from slimformer.models.modalities import TEXT_INPUTS, TextFamily
from slimformer.models.registry import register_family

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def read_st_config(model_dir: Path) -> tuple[str, int, bool]:
    """Pooling mode, max sequence length and whether a Normalize module follows the pooling, of a
    sentence-transformers directory (mean, 256, False if absent): what `SentenceTransformer.encode` returns."""
    pooling, max_len, normalize = "mean", 256, False
    modules = read_json(model_dir / "modules.json", [], "sentence-transformers modules file", ModelLoadError)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{model_dir / 'modules.json'}: expected a JSON list of modules; restore the file from "
                             "the model's source")
    for m in modules:
        if str(m.get("type", "")).endswith("Normalize"):
            normalize = True
        if str(m.get("type", "")).endswith("Pooling"):
            cfg_file = model_dir / str(m.get("path", "")) / "config.json"
            if cfg_file.exists():
                cfg = read_json(cfg_file, {}, "pooling config", ModelLoadError)
                for mode in POOLING_MODES:
                    key = f"pooling_mode_{mode}_tokens" if mode != "cls" else "pooling_mode_cls_token"
                    if cfg.get(key):
                        pooling = mode
                        break
    bert_cfg = model_dir / "sentence_bert_config.json"
    if bert_cfg.exists():
        max_len = int(read_json(bert_cfg, {}, "sentence-transformers config", ModelLoadError).get("max_seq_length",
                                                                                                   max_len))
    return pooling, max_len, normalize


def read_st_pooling(model_dir: Path) -> tuple[str, int]:
    """Pooling mode and max sequence length of a sentence-transformers directory (mean, 256 if absent)."""
    pooling, max_len, _ = read_st_config(model_dir)
    return pooling, max_len


@register_family("hf")
class HFEncoderAdapter(TextFamily):
    """A `transformers` encoder. Classifiers (…ForSequenceClassification) output logits; encoders
    output pooled embeddings (mean pooling unless the sentence-transformers config says otherwise).

    One family for plain encoders, sentence-transformers directories and sequence classifiers: they differ
    only in `kind` (encoder / classifier, hence metrics) and `pooling`, both attributes of the adapter."""

    catch_all = True  # any transformers directory no more specific family claims
    ort_optimizer_type = "bert"

    @contextmanager
    def eager_attention(self, model: nn.Module) -> Iterator[None]:
        """transformers' eager attention (the pattern onnxruntime's BERT optimizer fuses) while active."""
        base = getattr(model, "base_model", model)
        before = getattr(base.config, "_attn_implementation", None)
        setter = getattr(model, "set_attn_implementation", None)
        if setter is None or before in (None, "eager"):
            yield
            return
        setter("eager")
        try:
            yield
        finally:
            setter(before)

    def __init__(self, model: nn.Module, model_id: str, tokenizer: Any = None, pooling: str = "mean",
                 max_length: int = 128, source_dir: Path | None = None, normalize: bool = False) -> None:
        super().__init__(model, model_id, source_dir)
        if pooling not in POOLING_MODES:
            raise ModelLoadError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
        self.kind = "classifier" if _is_classifier(model) else "encoder"
        if self.kind == "encoder" and getattr(model, "pooler", None) is not None:
            model.pooler = None  # the pooled CLS projection is unused by embedding pooling; not deployed
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize  # a sentence-transformers Normalize module: encode() L2-normalises
        self.max_length = max_length
        config = model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        if hidden is None:
            raise ModelLoadError(f"{type(model).__name__}: config has no hidden_size")
        self.hidden = int(hidden)
        self.layers, units = describe_model(model, self.hidden)
        emb = model.get_input_embeddings()
        prefix = _module_path(model, emb)
        self.units = [Unit(prefix, "embedding", None, tuple(emb.weight.shape), False), *units]

    # -- data --------------------------------------------------------------------------------------
    def make_batches(self, samples: Sequence[Any], batch_size: int, labels: Sequence[int] | None = None
                     ) -> list[Batch]:
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.model_id}: no tokenizer files; text data cannot be encoded")
        batches = []
        for i in range(0, len(samples), batch_size):
            chunk = [str(s) for s in samples[i:i + batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            inputs = {k: v for k, v in enc.items() if k in TEXT_INPUTS}
            lab = None if labels is None else torch.as_tensor(list(labels[i:i + batch_size]))
            batches.append(Batch(inputs, lab))
        return batches

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(**batch.inputs)
        if self.kind == "classifier":
            return out.logits
        return self._pool(out.last_hidden_state, batch)

    def _pool(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        summed = (hidden * mask).sum(1)
        count = mask.sum(1).clamp(min=1)
        return summed / (count.sqrt() if self.pooling == "mean_sqrt_len" else count)

    # -- deployed outputs --------------------------------------------------------------------------
    # Quality is measured on `output` (pooled, before the L2 normalisation): cosine and cosine neighbours
    # are invariant to it, so every quality number is the same either way, and recovery's losses keep their
    # scale. The deployed graph returns what `SentenceTransformer.encode` returns (normalised when
    # modules.json has a Normalize step) plus the token embeddings ST's ONNX backend / Optimum read.
    def export_output_names(self) -> tuple[str, ...]:
        return ("logits",) if self.kind == "classifier" else ("sentence_embedding", "last_hidden_state")

    def export_outputs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        out = model(**batch.inputs)
        if self.kind == "classifier":
            return (out.logits,)
        hidden = out.last_hidden_state
        pooled = self._pool(hidden, batch)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled, hidden

    def dynamic_axes(self, batch: Batch) -> dict[str, dict[int, str]]:
        axes = super().dynamic_axes(batch)
        if "last_hidden_state" in axes:
            axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        return axes

    def export_metadata(self) -> dict[str, str]:
        if self.kind == "classifier":
            return {"kind": "classifier", "max_length": str(self.max_length)}
        return {"kind": "encoder", "pooling": self.pooling, "normalize": str(self.normalize).lower(),
                "max_length": str(self.max_length)}

    def encode(self, model: nn.Module, samples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """`SentenceTransformer.encode` of `model` on texts: pooled, normalised as modules.json says."""
        with torch.no_grad():
            return torch.cat([self.export_outputs(model, b)[0] for b in self.make_batches(samples, batch_size)])

    # -- discovery -----------------------------------------------------------------------------------
    @classmethod
    def detect(cls, local_dir: Path, config: Mapping[str, Any]) -> bool:
        """A transformers config (`model_type`), or any config.json that is not a timm one."""
        return "model_type" in config or "architecture" not in config

    @classmethod
    def from_dir(cls, local_dir: Path, model_id: str, max_length: int | None = None) -> HFEncoderAdapter:
        return load_hf_dir(local_dir, model_id=model_id, max_length=max_length)

    # -- persistence -------------------------------------------------------------------------------
    def copy_source_files(self, out_dir: Path) -> None:
        """The sentence-transformers metadata, so a compressed directory keeps its pooling config."""
        if self.source_dir is not None:
            copy_st_files(self.source_dir, out_dir)

    def save_base(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)
        meta = {"family": self.family, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "model_id": self.model_id, "kind": self.kind}
        (out_dir / "slimformer_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def skeleton(cls, out_dir: Path) -> HFEncoderAdapter:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        meta = json.loads((out_dir / "slimformer_model.json").read_text())
        config = AutoConfig.from_pretrained(out_dir)
        auto = AutoModelForSequenceClassification if meta["kind"] == "classifier" else AutoModel
        model = auto.from_config(config)
        normalize = bool(meta.get("normalize", False))  # older directories: read their modules.json
        if "normalize" not in meta and (out_dir / "modules.json").exists():
            normalize = read_st_config(out_dir)[2]
        return cls(model, meta["model_id"], _tokenizer(out_dir), meta["pooling"], meta["max_length"], out_dir,
                   normalize)


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ModelLoadError("input embedding table is not a submodule of the model")


def _tokenizer(model_dir: Path) -> Any:
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_hf_dir(model_dir: Path, model_id: str | None = None, max_length: int | None = None
                ) -> HFEncoderAdapter:
    """Load a local `transformers` or sentence-transformers directory."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    pooling, st_max, normalize = "mean", 128, False
    if (model_dir / "modules.json").exists():
        pooling, st_max, normalize = read_st_config(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: not a transformers model directory ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]})") from None
    archs = config.architectures or []
    auto = AutoModelForSequenceClassification if any(
        a.endswith("ForSequenceClassification") for a in archs) else AutoModel
    kwargs: dict[str, Any] = {}
    if auto is AutoModel and getattr(config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "electra"):
        kwargs["add_pooling_layer"] = False
    try:
        model = auto.from_pretrained(model_dir, **kwargs)
    except TypeError:
        model = auto.from_pretrained(model_dir)
    length = max_length or min(st_max, 256)
    return HFEncoderAdapter(model, model_id or str(model_dir), _tokenizer(model_dir), pooling, length, model_dir,
                            normalize)


def copy_st_files(src: Path, dst: Path) -> None:
    """Copy sentence-transformers metadata so a compressed directory keeps its pooling config."""
    for f in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    if (src / "modules.json").exists():  # every module folder (1_Pooling, 2_Normalize...), not the model itself
        for m in json.loads((src / "modules.json").read_text()):
            sub = str(m.get("path", ""))
            if sub and (src / sub).is_dir():
                shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling", dirs_exist_ok=True)
