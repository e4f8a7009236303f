"""What a family's input modality decides: where its data comes from, how samples are drawn, and the
shape of its export and latency inputs. `TextFamily` serves tokenised-text models (HF encoders and
classifiers; decoder LMs next), `ImageFamily` image classifiers (timm ViTs on Fashion-MNIST)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from slimformer import data as data_mod
from slimformer.data.fashion_mnist import IMAGE_SOURCES, load_train_images
from slimformer.errors import ConfigError, ModelLoadError, SlimformerError
from slimformer.models.base import Batch, EvalSamples, ModelAdapter, Samples

SAMPLE_TEXTS = ("A short sentence.", "A second, somewhat longer example sentence used to trace the graph.")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _feed_rows(samples: Sequence[Any], batch: int) -> list[Any]:
    """`batch` samples, cycling through `samples` when there are fewer."""
    return [samples[i % len(samples)] for i in range(batch)]


class TextFamily(ModelAdapter):
    """Models of tokenised text: a `tokenizer` and `max_length` attribute; data from slimformer.data texts."""

    default_data_source: ClassVar[str] = "fortunes"
    has_sequence_axis: ClassVar[bool] = True
    doc_label: ClassVar[str] = "text"
    tokenizer: Any
    max_length: int

    # -- data --------------------------------------------------------------------------------------
    def eval_samples(self, source: str, n_search: int, n_heldout: int, n_calibration: int, seed: int
                     ) -> EvalSamples:
        if source in IMAGE_SOURCES:
            raise ConfigError("data.source fashion-mnist holds images; use it with a timm ViT model")
        try:
            sets = data_mod.text_sets(source, n_calibration, n_search, n_heldout, seed)
        except SlimformerError as exc:
            raise ConfigError(str(exc)) from None
        search, heldout, calibration = sets.search, sets.heldout, sets.calibration

        def by_length(texts: list[str]) -> list[str]:  # less padding per batch; metrics are order-free
            return sorted(texts, key=len)

        return EvalSamples(Samples(by_length(search)), Samples(by_length(heldout)), Samples(by_length(calibration)))

    def heldout_samples(self, source: str, n: int) -> Samples:
        return Samples(data_mod.text_sets(source, 0, 0, n).heldout)  # a search's (seed 0) held-out texts

    def calibration_samples(self, source: str, n: int) -> Sequence[Any]:
        return sorted(data_mod.text_sets(source, n, 0, 0).calibration, key=len)  # a search's (seed 0)

    def recovery_exclusions(self, source: str, n: int) -> list[str]:
        return list(self.heldout_samples(source, n).inputs)

    def recovery_source(self, requested: str, search_source: str | None = None) -> str:
        if requested != "auto":
            return requested
        if search_source is not None and search_source not in ("fortunes",):
            return search_source  # the search's own text source, less its held-out texts
        from slimformer.data.training import default_text_source

        return default_text_source()

    def recovery_samples(self, source: str, exclude: Iterable[str], limit: int | None, seed: int,
                         bucket: bool = True) -> Sequence[Any]:
        from slimformer.data.training import training_texts

        if source in IMAGE_SOURCES:
            raise ConfigError(f"recovery data {source!r} holds images; a text model needs texts (e.g. fortunes)")
        texts = training_texts(source, exclude, limit, seed)
        if bucket and self.tokenizer is not None:  # stable sort: ties keep the seeded shuffle's order
            lengths = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            texts = [t for _, t in sorted(zip((len(x) for x in lengths), texts, strict=True), key=lambda p: p[0])]
        return texts

    # -- export inputs and latency shapes ----------------------------------------------------------
    def trace_batch(self) -> Batch:
        """Two texts of different lengths, so padding is traced."""
        return self.make_batches(list(SAMPLE_TEXTS), 2)[0]

    def fixed_length_feed(self, samples: Sequence[Any], batch: int, seq: int) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.model_id}: no tokenizer; text inputs cannot be built")
        chosen = _feed_rows(samples, batch)
        enc = self.tokenizer([str(s) for s in chosen], padding="max_length", truncation=True, max_length=seq,
                             return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in TEXT_INPUTS}

    def default_latency_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((1, 16), (1, 32), (1, 64), (1, 128))

    @property
    def default_latency_seq(self) -> int:
        return 128


class ImageFamily(ModelAdapter):
    """Image classifiers on Fashion-MNIST: an `img_size` attribute and a patch grid for the token count."""

    default_data_source: ClassVar[str] = IMAGE_SOURCES[0]
    has_sequence_axis: ClassVar[bool] = False
    doc_label: ClassVar[str] = "vit"
    img_size: tuple[int, int]

    # -- data --------------------------------------------------------------------------------------
    def _check_source(self, source: str) -> None:
        if source not in IMAGE_SOURCES:
            raise ConfigError(f"data.source {source!r}: a ViT needs images; use fashion-mnist")

    def eval_samples(self, source: str, n_search: int, n_heldout: int, n_calibration: int, seed: int
                     ) -> EvalSamples:
        self._check_source(source)
        train_x, train_y = data_mod.load_fashion_mnist("train", limit=n_calibration + n_search)
        test_x, test_y = data_mod.load_fashion_mnist("test", limit=n_heldout)
        if len(train_x) < n_calibration + n_search or len(test_x) < n_heldout:
            raise ConfigError(f"data: the packaged Fashion-MNIST sample has {len(train_x)} train and {len(test_x)} "
                              "test images; lower calibration_samples + search_samples (train images, disjoint) "
                              "or heldout_samples (test images)")
        # calibration = the first train images, search = the next ones (disjoint), held-out = the test split
        search = slice(n_calibration, n_calibration + n_search)
        return EvalSamples(Samples(train_x[search], train_y[search]), Samples(test_x, test_y),
                           Samples(train_x[:n_calibration]))

    def heldout_samples(self, source: str, n: int) -> Samples:
        x, y = data_mod.load_fashion_mnist("test", limit=n)
        return Samples(x, y)

    def calibration_samples(self, source: str, n: int) -> Sequence[Any]:
        return data_mod.load_fashion_mnist("train", limit=n)[0]

    def recovery_exclusions(self, source: str, n: int) -> list[str]:
        return []  # held-out images are the test split, recovery trains on the train split

    def recovery_source(self, requested: str, search_source: str | None = None) -> str:
        return IMAGE_SOURCES[0] if requested == "auto" else requested

    def recovery_samples(self, source: str, exclude: Iterable[str], limit: int | None, seed: int,
                         bucket: bool = True) -> Sequence[Any]:
        if source not in IMAGE_SOURCES:
            raise ConfigError(f"recovery data {source!r}: a ViT recovers on images; use fashion-mnist")
        return load_train_images(limit)

    # -- export inputs and latency shapes ----------------------------------------------------------
    def trace_batch(self) -> Batch:
        """Two blank images at the model's input size."""
        return self.make_batches(np.zeros((2, *self.img_size), dtype=np.uint8), 2)[0]

    def fixed_length_feed(self, samples: Sequence[Any], batch: int, seq: int) -> dict[str, np.ndarray]:
        b = self.make_batches(np.stack(_feed_rows(samples, batch)), batch)[0]
        return {k: v.numpy() for k, v in b.inputs.items()}

    def token_count(self) -> int:
        """Tokens per image: the patch grid plus the class token."""
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise ModelLoadError(f"{self.model_id}: no patch_embed.grid_size; the token count is unknown")
        return int(grid[0] * grid[1]) + 1

    def default_latency_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((1, self.token_count()), (8, self.token_count()))

    @property
    def default_latency_seq(self) -> int:
        return self.default_latency_shapes()[-1][1]
