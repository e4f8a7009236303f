"""Packaged data samples and text loaders."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from slimformer import data
from slimformer.data import (
    DATA_DIR,
    debian_fortunes,
    fashion_mnist_classes,
    load_fashion_mnist,
    load_fortunes,
    load_texts,
    text_splits,
)
from slimformer.errors import SlimformerError

# ----------------------------------------------------------------------------------------------
# fortunes corpus


def test_fortunes_corpus_size_and_fields() -> None:
    rows = load_fortunes()
    assert 1000 <= len(rows) <= 1500
    texts = [text for text, _ in rows]
    assert len(set(texts)) == len(texts), "texts are de-duplicated"
    for text, category in rows:
        assert isinstance(text, str) and isinstance(category, str)
        assert 40 <= len(text) <= 400
        assert text == text.strip() and "\n" not in text and "  " not in text
        assert category
    categories = Counter(category for _, category in rows)
    assert len(categories) >= 20, "sample is spread across many categories"
    assert max(categories.values()) <= 0.05 * len(rows), "no category dominates the sample"


def test_fortunes_file_is_small_and_licensed() -> None:
    assert (DATA_DIR / "fortunes.jsonl").stat().st_size < 300_000
    license_text = (DATA_DIR / "LICENSE-fortunes.txt").read_text(encoding="utf-8")
    assert "Regents of the University of California" in license_text
    assert "fortune-mod" in license_text
    mnist_license = (DATA_DIR / "LICENSE-fashion-mnist.txt").read_text(encoding="utf-8")
    assert "Zalando SE" in mnist_license and "MIT" in mnist_license


def test_load_fortunes_returns_a_fresh_list() -> None:
    rows = load_fortunes()
    rows.clear()
    assert load_fortunes(), "mutating the returned list must not empty the cached corpus"


def test_load_texts_fortunes_matches_corpus_and_limit() -> None:
    texts = [text for text, _ in load_fortunes()]
    assert load_texts("fortunes") == texts
    assert load_texts("fortunes", limit=5) == texts[:5]
    assert load_texts("fortunes", limit=0) == []


# ----------------------------------------------------------------------------------------------
# splits


def test_text_splits_disjoint_sized_and_deterministic() -> None:
    search, heldout = text_splits(200, 100, seed=0)
    assert len(search) == 200 and len(heldout) == 100
    assert not set(search) & set(heldout)
    assert (search, heldout) == text_splits(200, 100, seed=0)
    corpus = set(load_texts("fortunes"))
    assert set(search) <= corpus and set(heldout) <= corpus


def test_text_splits_depend_on_seed() -> None:
    assert text_splits(50, 50, seed=0) != text_splits(50, 50, seed=1)


def test_text_splits_heldout_independent_of_search_size() -> None:
    small_search, heldout_a = text_splits(10, 40, seed=3)
    large_search, heldout_b = text_splits(300, 40, seed=3)
    assert heldout_a == heldout_b
    assert large_search[:10] == small_search


def test_text_splits_can_use_whole_corpus() -> None:
    n = len(load_fortunes())
    search, heldout = text_splits(n - 7, 7)
    assert sorted(search + heldout) == sorted(load_texts("fortunes"))
    assert text_splits(0, 0) == ([], [])


def test_text_splits_too_large_raises() -> None:
    n = len(load_fortunes())
    with pytest.raises(ValueError, match=r"exceeds the \d+ texts"):
        text_splits(n, 1)


def test_text_splits_negative_raises() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        text_splits(-1, 10)


# ----------------------------------------------------------------------------------------------
# files


def test_load_texts_txt_round_trip(tmp_path) -> None:
    texts = ["first text", "second text, with a comma", "third: émigré café"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts[:2]) + "\n\n   \n  " + texts[2] + "  \n", encoding="utf-8")
    assert load_texts(str(path)) == texts
    assert load_texts(str(path), limit=2) == texts[:2]


def test_load_texts_jsonl_round_trip(tmp_path) -> None:
    texts = ['a "quoted" text', "multi\nline text", "ünïcödé"]
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    assert load_texts(str(path)) == texts
    assert load_texts(str(path), limit=1) == texts[:1]


def test_load_texts_jsonl_without_text_field_raises(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a string field 'text'"):
        load_texts(str(path))


def test_load_texts_jsonl_invalid_json_raises(tmp_path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not valid JSON"):
        load_texts(str(path))


def test_load_texts_missing_path_raises(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"nope\.txt.*does not exist.*\.txt.*\.jsonl.*hf:"):
        load_texts(str(missing))


def test_load_texts_unsupported_extension_raises(tmp_path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'"):
        load_texts(str(path))


def test_load_texts_negative_limit_raises() -> None:
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_texts("fortunes", limit=-1)


# ----------------------------------------------------------------------------------------------
# Hugging Face sources (without network or the datasets library)


def test_load_texts_hf_bad_spec_raises() -> None:
    with pytest.raises(ValueError, match=r"expected 'hf:NAME\[:CONFIG\]:SPLIT:COLUMN'"):
        load_texts("hf:wikitext")


def test_load_texts_hf_without_datasets_says_pip_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError, match="pip install datasets"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test:text")


class _FakeDataset:
    column_names = ["text", "label"]

    def __getitem__(self, column: str) -> list[object]:
        assert column == "text"
        return ["", "  first  ", "second", None, "third"]


class _FakeDatasets:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str]] = []

    def load_dataset(self, name: str, config: str | None, split: str) -> _FakeDataset:
        self.calls.append((name, config, split))
        return _FakeDataset()


def test_load_texts_hf_parses_spec_and_skips_empty(monkeypatch) -> None:
    fake = _FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts("hf:wikitext:wikitext-2-raw-v1:test:text") == ["first", "second", "third"]
    assert load_texts("hf:org/name:validation:text", limit=2) == ["first", "second"]
    assert fake.calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("org/name", None, "validation")]
    with pytest.raises(ValueError, match="has no column 'body'"):
        load_texts("hf:org/name:validation:body")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize(("split", "n"), [("train", 2000), ("test", 1000)])
def test_fashion_mnist_shapes_dtypes_labels(split: str, n: int) -> None:
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() <= 9
    assert set(np.unique(labels).tolist()) == set(range(10)), "every class is present"
    assert images.max() > 200 and images.min() == 0, "real pixel data, not zeros"


def test_fashion_mnist_default_split_and_limit() -> None:
    images, labels = load_fashion_mnist(limit=16)
    test_images, test_labels = load_fashion_mnist("test")
    assert images.shape == (16, 28, 28)
    np.testing.assert_array_equal(images, test_images[:16])
    np.testing.assert_array_equal(labels, test_labels[:16])


def test_fashion_mnist_classes() -> None:
    classes = fashion_mnist_classes()
    assert len(classes) == 10
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot"


def test_fashion_mnist_bad_split_raises() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("validation")


def test_module_exports() -> None:
    for name in data.__all__:
        assert hasattr(data, name)


# ----------------------------------------------------------------------------------------------
# Debian's fortunes package (CI installs it: scripts/ci-services.sh)

needs_debian_fortunes = pytest.mark.skipif(
    not debian_fortunes.installed(), reason="Debian's fortunes package is not installed (apt-get install fortunes)")


@needs_debian_fortunes
def test_debian_fortunes_hold_every_packaged_text_unchanged() -> None:
    """The packaged sample was cleaned by the same rules, so held-out texts can be excluded by equality."""
    texts = data.load_texts("debian-fortunes")
    assert len(texts) > 10_000 and len(set(texts)) == len(texts)
    assert set(data.load_texts("fortunes")) <= set(texts)
    assert data.load_texts("debian-fortunes", limit=5) == texts[:5]


def test_debian_fortunes_missing_directory_says_how_to_install(tmp_path) -> None:
    with pytest.raises(SlimformerError, match="apt-get install fortunes"):
        debian_fortunes.collect_fortunes(tmp_path / "nowhere")
    assert not debian_fortunes.installed(tmp_path)


def test_fortune_cleaning_drops_ascii_art_and_joins_lines() -> None:
    assert debian_fortunes.clean_entry("A fortune\n   that spans   two lines and is long enough.") == \
        "A fortune that spans two lines and is long enough."
    assert debian_fortunes.clean_entry("_\bB_\bo_\bl_\bd and underlined words, long enough to be kept here.") == \
        "Bold and underlined words, long enough to be kept here."
    assert debian_fortunes.clean_entry("/\\/\\/\\ |__| /\\/\\/\\ |__| /\\/\\/\\ |__| /\\/\\/\\ |__| ***") is None
    assert debian_fortunes.clean_entry("too short") is None
    assert debian_fortunes.split_entries("one\n%\ntwo\nlines\n%\n") == ["one", "two\nlines", ""]


def test_python_docs_is_a_second_packaged_domain() -> None:
    """The packaged docstrings load by name, are non-empty, unique, and share no text with the fortunes."""
    from slimformer.data import load_texts

    docs = load_texts("python-docs")
    assert len(docs) == 1121 and len(set(docs)) == len(docs)
    assert all(40 <= len(t) <= 400 for t in docs)
    assert not set(docs) & set(load_texts("fortunes"))
    assert load_texts("python-docs", limit=5) == docs[:5]


def test_text_sets_are_disjoint_and_stable() -> None:
    """Calibration, search and held-out never share a text; held-out depends only on its own size and seed,
    calibration only on its own; fortunes' held-out equals text_splits'."""
    from slimformer.data import text_sets

    for source in ("fortunes", "python-docs"):
        s = text_sets(source, 64, 128, 256, seed=0)
        assert (len(s.calibration), len(s.search), len(s.heldout)) == (64, 128, 256)
        assert not (set(s.calibration) & set(s.search) or set(s.calibration) & set(s.heldout)
                    or set(s.search) & set(s.heldout))
        assert text_sets(source, 0, 0, 256).heldout == s.heldout
        assert text_sets(source, 64, 0, 0).calibration == s.calibration
        assert text_sets(source, 64, 300, 10).search[:128] == s.search
    assert text_sets("fortunes", 64, 128, 256).heldout == text_splits(128, 256)[1]


def test_text_sets_deduplicate_and_name_the_fields(tmp_path: Path) -> None:
    """A repeated line of a user's file lands in one set only; asking for too many texts names the fields."""
    from slimformer.data import text_sets

    f = tmp_path / "t.txt"
    f.write_text("\n".join(["same text"] * 5 + [f"text {i}" for i in range(7)]) + "\n")
    s = text_sets(str(f), 2, 3, 3)
    assert sorted(s.calibration + s.search + s.heldout) == sorted({"same text", *(f"text {i}" for i in range(7))})
    with pytest.raises(SlimformerError, match=r"8 distinct texts, fewer than calibration_samples \+ search_samples"):
        text_sets(str(f), 4, 4, 4)
    with pytest.raises(SlimformerError, match="data.search_samples must be >= 0"):
        text_sets(str(f), 1, -1, 1)
