"""Packed serialisation of a compressed model: safetensors of the deployable tensors plus the recipe.

A compressed directory holds `slimformer.safetensors` (int codes packed, fp32 scales, sparse masks or 2:4
indices, fp32/fp16 values; every shared module once), `slimformer.yaml` (the recipe) and the base
model's config/tokenizer, so `load_compressed` rebuilds the model with no access to the original weights.
The packed file is deliberately not called `model.safetensors`: `transformers.AutoModel.from_pretrained(DIR)`
and `SentenceTransformer(DIR)` then fail loudly ("no file named model.safetensors...") instead of
loading the directory as a plain checkpoint with random weights. Directories written before this change
(`model.safetensors` + `slimformer.yaml`) still load. `apply --onnx` adds `onnx/model.onnx`
(ONNX_FILE), where sentence-transformers' ONNX backend / Optimum look for it.
`load_any` opens either kind of model: a compressed directory, or anything `models.load` accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimformer.compression.apply import apply_plan
from slimformer.compression.embedding_tiers import TieredEmbedding
from slimformer.compression.modules import SlimEmbedding, SlimLinear
from slimformer.compression.recipe import Recipe
from slimformer.errors import ModelLoadError
from slimformer.fileio import atomic_dir, read_json
from slimformer.models import COMPRESSED_MARKER, get_family, load_from, locate, model_load_errors
from slimformer.models.base import ModelAdapter

MODEL_FILE = "slimformer.safetensors"
LEGACY_MODEL_FILE = "model.safetensors"  # packed file name of directories written by slimformer <= 0.1
RECIPE_FILE = COMPRESSED_MARKER  # "slimformer.yaml"
ONNX_FILE = "onnx/model.onnx"  # the deployable graph inside a compressed directory (apply --onnx)


def pack_model(model: nn.Module) -> dict[str, Tensor]:
    """Deployable tensors of a (compressed) model; shared modules and parameters appear once."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    slim_params: set[int] = set()
    for path, mod in model.named_modules():  # named_modules yields a shared module once
        if isinstance(mod, (SlimLinear, SlimEmbedding, TieredEmbedding)):
            out.update(mod.pack(path))
            slim_params.add(id(mod.weight))
            bias = getattr(mod, "bias", None)
            if bias is not None:
                out[f"{path}.bias"] = bias.detach().to(torch.float32).contiguous()
                slim_params.add(id(bias))
    for name, p in model.named_parameters():
        if id(p) in slim_params or id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p.detach().to(torch.float32).contiguous()
    return {k: v.cpu() for k, v in out.items()}


def packed_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_out_dir(out_dir: Path) -> None:
    """An output path must be new, empty or an earlier slimformer output (which is replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not (out_dir / RECIPE_FILE).exists():
        raise ModelLoadError(f"--out {out_dir} exists and is not a slimformer output; choose an empty path")


def write_compressed(adapter: ModelAdapter, model: nn.Module, recipe: Recipe, out_dir: Path) -> None:
    """Write the files of a compressed model directory into an existing (temp) directory."""
    adapter.save_base(out_dir)
    adapter.copy_source_files(out_dir)
    save_file(pack_model(model), str(out_dir / MODEL_FILE), metadata={"format": "slimformer-packed-v1"})
    recipe.save(out_dir / RECIPE_FILE)


def save_compressed(adapter: ModelAdapter, model: nn.Module, recipe: Recipe, out_dir: Path) -> Path:
    """Write a compressed model directory atomically (fileio.atomic_dir: a temp dir renamed into place)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_compressed(adapter, model, recipe, tmp)
    return out_dir


def load_compressed(model_dir: Path) -> ModelAdapter:
    """Rebuild a compressed model: architecture from config, structure from the recipe, weights unpacked.

    The returned adapter's `model` is the compressed model and its `recipe` attribute the recipe.
    """
    with model_load_errors(model_dir):
        return _load_compressed(model_dir)


def _load_compressed(model_dir: Path) -> ModelAdapter:
    meta_file = model_dir / "slimformer_model.json"
    if not meta_file.exists():
        raise ModelLoadError(f"{model_dir}: missing slimformer_model.json; not a slimformer output directory")
    meta = read_json(meta_file, {}, "model metadata", ModelLoadError)
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str):
        raise ModelLoadError(f"{meta_file}: no model family recorded; the directory is damaged, write it again "
                             "with `slimformer apply --out`")
    adapter = get_family(meta["family"]).skeleton(model_dir)
    recipe = Recipe.load(model_dir / RECIPE_FILE)
    plan = recipe.to_plan(adapter)
    model = apply_plan(adapter, plan, rtn_fallback=True)  # values come from the file below
    wfile = model_dir / MODEL_FILE
    if not wfile.is_file() and (model_dir / LEGACY_MODEL_FILE).is_file():
        wfile = model_dir / LEGACY_MODEL_FILE
    if not wfile.is_file():
        raise ModelLoadError(f"{model_dir}: no {MODEL_FILE}; not a complete slimformer output directory")
    tensors = load_file(str(wfile))
    for path, mod in model.named_modules():
        if isinstance(mod, (SlimLinear, SlimEmbedding, TieredEmbedding)):
            mod.unpack(path, tensors)
            if getattr(mod, "bias", None) is not None:
                with torch.no_grad():
                    mod.bias.copy_(tensors[f"{path}.bias"])
    slim = {id(m.weight) for m in model.modules() if isinstance(m, (SlimLinear, SlimEmbedding, TieredEmbedding))}
    slim |= {id(m.bias) for m in model.modules() if isinstance(m, SlimLinear) and m.bias is not None}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in slim or id(p) in seen:
            continue
        seen.add(id(p))
        if name not in tensors:
            raise ModelLoadError(f"{wfile}: tensor {name} is missing; the file is damaged")
        with torch.no_grad():
            p.copy_(tensors[name])
    adapter.model = model.eval()
    adapter.model_id = recipe.model.id
    adapter.recipe = recipe  # type: ignore[attr-defined]
    return adapter


def load_any(model: str, max_length: int | None = None) -> ModelAdapter:
    """Load a model directory, hub id, `timm:ARCH`, or compressed slimformer output (`slimformer.yaml`)."""
    source = locate(model)
    if source.local_dir is not None and (source.local_dir / RECIPE_FILE).exists():
        return load_compressed(source.local_dir)
    return load_from(source, max_length)
