"""A ViT trained here on real Fashion-MNIST images: real learning, then compression and search on it.

The module fixture trains a tiny ViT (2 blocks of width 32) for a few seconds on the packaged 2,000
training images; every test then uses that trained model and the 1,000 packaged test images.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimformer.compression.apply import apply_plan
from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_any, save_compressed
from slimformer.data import load_fashion_mnist
from slimformer.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, load_full_fashion_mnist, read_idx
from slimformer.evaluators.quality import FidelityEvaluator
from slimformer.models import TimmViTAdapter, load


def _train_vit_script():
    """benchmarks/train_vit.py (the training script lives outside the library), imported by path."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_vit.py"
    if "train_vit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_vit", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_vit"] = module  # dataclasses resolve their module while the class is created
        spec.loader.exec_module(module)
    return sys.modules["train_vit"]


TRAIN_INFO = _train_vit_script().TRAIN_INFO
train_fashion_mnist_vit = _train_vit_script().train_fashion_mnist_vit

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit-real") / "teacher"
    result = train_fashion_mnist_vit(out, epochs=4, seed=0, threads=1, full_dataset=False, log=None,
                                     model_args=TINY, batch_size=32, lr=5e-3, augment=False)
    return result


@pytest.fixture(scope="module")
def test_images():
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def adapter(trained) -> TimmViTAdapter:
    a = load(str(trained.out_dir))
    assert isinstance(a, TimmViTAdapter)
    return a


@pytest.fixture
def evaluator(adapter, test_images) -> FidelityEvaluator:
    """Function-scoped on purpose: teacher logits must come from the same torch thread count as the
    student's (the autouse single-thread fixture applies per test), or identical models differ in ulps."""
    x, y = test_images
    return FidelityEvaluator(adapter, adapter.make_batches(x, 250, y))


def _uniform(adapter: TimmViTAdapter, **spec) -> CompressionPlan:
    return CompressionPlan(units={u.name: UnitSpec(**spec) for u in adapter.units})


def test_training_learns_real_images(trained, adapter, test_images) -> None:
    assert trained.data_source == "packaged-sample" and trained.train_size == 2000
    assert trained.full_test_accuracy is None and trained.test_accuracy == trained.packaged_test_accuracy
    assert trained.packaged_test_accuracy > 0.5  # chance is 0.1
    info = json.loads((trained.out_dir / TRAIN_INFO).read_text())
    assert info["epochs"] == 4 and info["train_size"] == 2000 and info["seed"] == 0
    assert info["packaged_test_accuracy"] == trained.packaged_test_accuracy
    assert info["torch_version"] == torch.__version__
    # the saved directory reproduces the reported accuracy through slimformer's own preprocessing
    x, y = test_images
    with torch.no_grad():
        pred = adapter.model(adapter.preprocess(x)).argmax(-1).numpy()
    assert float((pred == y).mean()) == pytest.approx(trained.packaged_test_accuracy, abs=1e-9)


def test_loaded_adapter_units_and_normalisation(adapter, test_images) -> None:
    n = TINY["depth"]
    assert [(u.layer, u.role) for u in adapter.units] == [
        (i, r) for i in range(n) for r in ("qkv", "attn_out", "ffn_in", "ffn_out")]
    assert adapter.in_chans == 1 and adapter.img_size == (28, 28)
    assert adapter.mean == pytest.approx((FMNIST_MEAN,)) and adapter.std == pytest.approx((FMNIST_STD,))
    x = test_images[0][:4]
    expected = (torch.from_numpy(x).float().unsqueeze(1) / 255.0 - FMNIST_MEAN) / FMNIST_STD
    torch.testing.assert_close(adapter.preprocess(x), expected, rtol=0, atol=1e-6)


def test_identity_plan_is_exact(adapter, evaluator) -> None:
    model = apply_plan(adapter, CompressionPlan())
    res = evaluator.evaluate(model)
    assert res.metrics["agreement"] == 1.0 and res.metrics["neg_kl"] == pytest.approx(0.0, abs=1e-7)
    x = evaluator.batches[0].inputs["x"]
    with torch.no_grad():
        assert torch.equal(model(x), adapter.model(x))
    assert res.metrics["accuracy"] == res.metrics["teacher_accuracy"]


def test_int8_keeps_agreement_and_int4_is_not_better(adapter, evaluator) -> None:
    int8 = evaluator.evaluate(apply_plan(adapter, _uniform(adapter, bits=8))).metrics
    int4 = evaluator.evaluate(apply_plan(adapter, _uniform(adapter, bits=4))).metrics
    assert int8["agreement"] >= 0.98
    assert int4["agreement"] <= int8["agreement"]
    assert int4["neg_kl"] < int8["neg_kl"] < 0.0


def test_half_the_heads(adapter, evaluator, test_images) -> None:
    plan = CompressionPlan(layers={i: LayerSpec(heads_kept=2) for i in range(len(adapter.layers))})
    model = apply_plan(adapter, plan)
    x = test_images[0][:100]
    with torch.no_grad():
        logits = model(adapter.preprocess(x))
    assert logits.shape == (100, 10) and torch.isfinite(logits).all()
    assert all(model.get_submodule(info.attention_path).num_heads == 2 for info in adapter.layers)
    assert evaluator.evaluate(model).metrics["agreement"] > 0.1


def test_save_compressed_round_trip(adapter, test_images, tmp_path) -> None:
    names = {u.role: [v.name for v in adapter.units if v.role == u.role] for u in adapter.units}
    plan = CompressionPlan(
        units={**{n: UnitSpec(bits=8) for n in names["qkv"] + names["attn_out"]},
               **{n: UnitSpec(rank=16, bits=4, group_size=16) for n in names["ffn_in"]},
               **{n: UnitSpec(sparsity=0.5, pattern="2:4", bits=4, group_size=32) for n in names["ffn_out"]}},
        layers={0: LayerSpec(heads_kept=2, neurons_kept=96)})
    model = apply_plan(adapter, plan)
    out = save_compressed(adapter, model, Recipe.from_plan(plan, adapter), tmp_path / "compressed")
    again = load_any(str(out))
    x = adapter.preprocess(test_images[0][:200])
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), model(x), rtol=0, atol=1e-6)


def test_tiny_search_on_the_trained_vit(trained, tmp_path) -> None:
    from slimformer.search import SearchConfig, run_search

    cfg = SearchConfig.model_validate({
        "model": str(trained.out_dir),
        "data": {"source": "fashion-mnist", "search_samples": 64, "heldout_samples": 128,
                 "calibration_samples": 32, "batch_size": 64},
        "space": {"per_layer": True, "groups": [
            {"select": {"role": ["qkv", "attn_out"]}, "bits": [8, 4], "group_size": [None, 32],
             "heads_kept": [2, 4]},
            {"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4], "group_size": [None, 32],
             "rank_fraction": [1.0, 0.5]}]},
        "budget": {"memory": "30%"},
        "deploy": "safetensors",  # a 0.1 MB model: the ONNX graph's own bytes would dominate the budget
        "quality_metric": "agreement",
        "sampler": {"name": "nsga2", "population_size": 4, "seed": 0},
        "trials": 8,
        "threads": 1,
        "baselines": False,  # the uniform baselines are covered elsewhere; keep this test short
    })
    res = run_search(cfg, run_dir=tmp_path / "run", progress=False)
    pareto = json.loads((res.run_dir / "pareto.json").read_text())
    assert pareto["quality_metric"] == "agreement" and pareto["trials"]
    for entry in pareto["trials"]:
        held = entry["heldout_metrics"]
        assert {"agreement", "accuracy", "teacher_accuracy", "neg_kl"} <= set(held)
        assert 0.0 <= held["accuracy"] <= 1.0 and held["teacher_accuracy"] > 0.5
        assert entry["memory_bytes"] <= pareto["budget_bytes"]
    assert res.summary.best_recipe is not None


def test_idx_reader_round_trip(tmp_path) -> None:
    import gzip
    import struct

    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    f = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(f, "wb") as g:
        g.write(b"\x00\x00\x08\x03" + struct.pack(">3I", *data.shape) + data.tobytes())
    np.testing.assert_array_equal(read_idx(f), data)
    labels = np.array([3, -1, 7], dtype=">i4")
    f2 = tmp_path / "y-idx1"
    f2.write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + labels.tobytes())
    np.testing.assert_array_equal(read_idx(f2), [3, -1, 7])
    f3 = tmp_path / "bad"
    f3.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="IDX header"):
        read_idx(f3)


def test_full_dataset_reader_matches_the_packaged_sample() -> None:
    full = load_full_fashion_mnist("test")
    if full is None:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    x, y = full
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,)
    px, py = load_fashion_mnist("test")
    np.testing.assert_array_equal(x[: len(px)], px)
    np.testing.assert_array_equal(y[: len(py)], py)


def test_missing_dataset_dir_falls_back(tmp_path) -> None:
    assert load_full_fashion_mnist("train", root=Path(tmp_path)) is None


def test_training_is_deterministic_under_the_seed(tmp_path) -> None:
    kw = dict(epochs=1, train_limit=256, threads=1, full_dataset=False, log=None, model_args=TINY, batch_size=32)
    a = train_fashion_mnist_vit(tmp_path / "a", seed=3, **kw)
    b = train_fashion_mnist_vit(tmp_path / "b", seed=3, **kw)
    c = train_fashion_mnist_vit(tmp_path / "c", seed=4, **kw)
    wa, wb, wc = ((r.out_dir / "model.safetensors").read_bytes() for r in (a, b, c))
    assert wa == wb and wa != wc
    assert a.final_train_loss == b.final_train_loss and a.train_size == 256
    # an existing output is replaced; a directory holding anything else is refused
    train_fashion_mnist_vit(tmp_path / "a", seed=3, **kw)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a vit_train output"):
        train_fashion_mnist_vit(other, seed=3, **kw)
    assert (other / "keep.txt").exists()
