"""Small, licensed data samples shipped with slimformer, and loaders for user-supplied text.

Packaged samples (regenerate with ``python benchmarks/make_data_samples.py``):

* ``fortunes.jsonl``: 1,200 English fortune cookies from Debian's ``fortunes`` packages
  (BSD license, see ``LICENSE-fortunes.txt``), one ``{"text", "category"}`` object per line.
* ``python_docs.jsonl``: 1,121 paragraphs of Python 3.11 standard-library docstrings (PSF license, see
  ``LICENSE-python-docs.txt``), one ``{"text", "module"}`` object per line: a second real text domain.
* ``fashion_mnist_sample.npz``: the first 2,000 train and 1,000 test Fashion-MNIST images
  (MIT license, Zalando SE, see ``LICENSE-fashion-mnist.txt``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from slimformer.errors import SlimformerError
from slimformer.fileio import read_text_file

__all__ = [
    "DATA_DIR",
    "FASHION_MNIST_FILE",
    "FORTUNES_FILE",
    "fashion_mnist_classes",
    "load_fashion_mnist",
    "load_fortunes",
    "load_texts",
    "text_splits",
    "TextSets",
    "text_sets",
]

DATA_DIR: Path = Path(__file__).resolve().parent
"""Directory holding the packaged data samples."""

FORTUNES_FILE: Path = DATA_DIR / "fortunes.jsonl"
PYTHON_DOCS_FILE: Path = DATA_DIR / "python_docs.jsonl"
FASHION_MNIST_FILE: Path = DATA_DIR / "fashion_mnist_sample.npz"

DEBIAN_FORTUNES = "debian-fortunes"
PYTHON_DOCS = "python-docs"
_TEXT_FORMATS = (
    "'fortunes' (the packaged corpus), 'debian-fortunes' (Debian's fortunes package), "
    "'python-docs' (packaged Python docstrings, a second domain), "
    "a .txt file (one text per non-empty line), "
    "a .jsonl file (one JSON object with a string field 'text' per line), "
    "or 'hf:NAME[:CONFIG]:SPLIT:COLUMN' (Hugging Face datasets)"
)


# ----------------------------------------------------------------------------------------------
# fortunes


@lru_cache(maxsize=1)
def _fortunes() -> tuple[tuple[str, str], ...]:
    rows = _read_jsonl(FORTUNES_FILE, fields=("text", "category"))
    return tuple((row["text"], row["category"]) for row in rows)


def load_fortunes() -> list[tuple[str, str]]:
    """The packaged fortunes corpus as ``(text, category)`` pairs, in file order.

    Every text is a single line of 40 to 400 characters; texts are unique. ``category`` is the
    name of the Debian fortune file the text came from (for example ``"science"``).
    """
    return list(_fortunes())


def text_splits(n_search: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the fortunes texts into a search set and a held-out set.

    The split is a seeded random permutation of the corpus: the search set is taken from its front and
    the held-out set from its back. The same arguments always give the same lists, the two lists never
    share a text, and for a fixed seed the held-out set does not depend on ``n_search`` (a larger
    ``n_search`` only extends the search set), so search sizes can be compared on the same held-out texts.

    Args:
        n_search: number of texts used while searching (scoring candidate plans).
        n_heldout: number of texts kept aside for the final evaluation.
        seed: seed of the permutation.

    Returns:
        ``(search_texts, heldout_texts)``.

    Raises:
        SlimformerError (a ``ValueError``): a negative size, or ``n_search + n_heldout`` larger than
        the corpus.
    """
    if n_search < 0 or n_heldout < 0:
        raise SlimformerError(
            f"text split sizes must be >= 0, got n_search={n_search}, n_heldout={n_heldout}"
        )
    texts = [text for text, _ in _fortunes()]
    if n_search + n_heldout > len(texts):
        raise SlimformerError(
            f"n_search + n_heldout = {n_search} + {n_heldout} = {n_search + n_heldout} exceeds the "
            f"{len(texts)} texts of the packaged fortunes corpus; ask for fewer texts or pass your own "
            f"corpus with load_texts()"
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    search = [texts[i] for i in order[:n_search]]
    heldout = [texts[i] for i in order[len(order) - n_heldout :]]
    return search, heldout


@dataclass(frozen=True)
class TextSets:
    """Three disjoint text sets drawn from one source: calibration (fits GPTQ Hessians, activation scales,
    structure statistics), search (scores trials) and held-out (final numbers only)."""

    calibration: list[str]
    search: list[str]
    heldout: list[str]


def text_sets(source: str, n_calibration: int, n_search: int, n_heldout: int, seed: int = 0) -> TextSets:
    """Draw disjoint calibration, search and held-out texts from `source` (any `load_texts` source).

    One seeded permutation of the source's distinct texts: calibration from its front, search right after it,
    held-out from its back. So calibration never scores a trial, held-out never steers anything, the held-out
    set depends only on (source, seed, n_heldout) and the calibration set only on (source, seed,
    n_calibration): `apply` and `bench` draw the same calibration and held-out texts as a search with the same
    seed. For the packaged fortunes (all distinct) the held-out texts equal `text_splits`'s.

    Raises:
        SlimformerError: a negative size, or more texts asked for than the source holds (names the fields).
    """
    sizes = {"calibration_samples": n_calibration, "search_samples": n_search, "heldout_samples": n_heldout}
    for name, n in sizes.items():
        if n < 0:
            raise SlimformerError(f"data.{name} must be >= 0, got {n}")
    texts = list(dict.fromkeys(load_texts(source)))  # a repeated text would otherwise sit in two sets
    total = n_calibration + n_search + n_heldout
    if total > len(texts):
        raise SlimformerError(
            f"data.source {source}: {len(texts)} distinct texts, fewer than calibration_samples + search_samples "
            f"+ heldout_samples = {n_calibration} + {n_search} + {n_heldout} = {total} (the three sets are "
            "disjoint); lower them or use a larger source"
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    calibration = [texts[i] for i in order[:n_calibration]]
    search = [texts[i] for i in order[n_calibration: n_calibration + n_search]]
    heldout = [texts[i] for i in order[len(order) - n_heldout:]] if n_heldout else []
    return TextSets(calibration, search, heldout)


# ----------------------------------------------------------------------------------------------
# generic text sources


def load_texts(source: str, limit: int | None = None) -> list[str]:
    """Load a list of texts from a named source.

    Args:
        source: one of

            * ``"fortunes"``: the packaged corpus (file order);
            * ``"python-docs"``: 1,121 paragraphs of Python 3.11 standard-library docstrings (PSF license,
              ``LICENSE-python-docs.txt``), packaged as a second real text domain (technical English);
            * ``"debian-fortunes"``: every cleaned text of Debian's ``fortunes`` package (12,435 here; the
              packaged 1,200 are a sample of them), when it is installed;
            * a path to a ``.txt`` file: one text per non-empty line (lines are stripped);
            * a path to a ``.jsonl`` file: one JSON object per non-empty line, text in field ``"text"``;
            * ``"hf:NAME[:CONFIG]:SPLIT:COLUMN"``: a Hugging Face dataset column, for example
              ``"hf:wikitext:wikitext-2-raw-v1:test:text"``; needs ``pip install datasets``.

        limit: keep at most this many texts (the first ones); ``None`` keeps all.

    Returns:
        The texts, in source order. Empty and whitespace-only texts are skipped for every source.

    Raises:
        SlimformerError (a ``ValueError``): unknown source, missing file, unsupported file type,
        malformed line, negative ``limit``, or ``datasets`` not installed for an ``hf:`` source.
    """
    if limit is not None and limit < 0:
        raise SlimformerError(f"limit must be >= 0 or None, got {limit}")
    if source == "fortunes":
        texts = [text for text, _ in _fortunes()]
        return texts if limit is None else texts[:limit]
    if source == PYTHON_DOCS:
        texts = [row["text"] for row in _read_jsonl(PYTHON_DOCS_FILE, fields=("text", "module"))]
        return texts if limit is None else texts[:limit]
    if source == DEBIAN_FORTUNES:
        from slimformer.data.debian_fortunes import debian_fortunes

        texts = list(debian_fortunes())
        return texts if limit is None else texts[:limit]
    if source.startswith("hf:"):
        return _load_hf_texts(source, limit)

    path = Path(source).expanduser()
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise SlimformerError(f"text source {str(path)!r} {reason}; accepted sources: {_TEXT_FORMATS}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = read_text_file(path, "text source", max_bytes=None).splitlines()
        texts = [line.strip() for line in lines if line.strip()]
    elif suffix == ".jsonl":
        texts = [row["text"].strip() for row in _read_jsonl(path, fields=("text",))]
        texts = [text for text in texts if text]
    else:
        raise SlimformerError(
            f"text source {str(path)!r} has unsupported extension {path.suffix!r}; "
            f"accepted sources: {_TEXT_FORMATS}"
        )
    return texts if limit is None else texts[:limit]


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a JSON-lines file; each row must be an object with string values for ``fields``."""
    rows: list[dict[str, str]] = []
    for lineno, line in enumerate(read_text_file(path, "text source", max_bytes=None).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlimformerError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise SlimformerError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for field in fields:
            if not isinstance(row.get(field), str):
                raise SlimformerError(f"{path}:{lineno}: expected a string field {field!r}")
        rows.append(row)
    return rows


def _load_hf_texts(source: str, limit: int | None) -> list[str]:
    parts = source[len("hf:") :].split(":")
    if len(parts) == 3:
        name, split, column = parts
        config: str | None = None
    elif len(parts) == 4:
        name, config, split, column = parts
    else:
        raise SlimformerError(
            f"bad Hugging Face source {source!r}; expected 'hf:NAME[:CONFIG]:SPLIT:COLUMN', "
            f"for example 'hf:wikitext:wikitext-2-raw-v1:test:text'"
        )
    if not all(parts):
        raise SlimformerError(f"bad Hugging Face source {source!r}: empty NAME, CONFIG, SPLIT or COLUMN")
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError as exc:
        raise SlimformerError(
            f"text source {source!r} needs the Hugging Face 'datasets' library: pip install datasets"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, unknown name/config/split: report as bad input
        raise SlimformerError(f"could not load Hugging Face dataset {source!r}: {exc}") from exc
    if column not in dataset.column_names:
        raise SlimformerError(
            f"Hugging Face dataset {source!r} has no column {column!r}; columns: {dataset.column_names}"
        )
    texts: list[str] = []
    for value in dataset[column]:
        if limit is not None and len(texts) >= limit:
            break
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
    return texts


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def load_fashion_mnist(split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from the packaged Fashion-MNIST sample.

    Args:
        split: ``"train"`` (first 2,000 training images) or ``"test"`` (first 1,000 test images).
        limit: keep at most this many images (the first ones); ``None`` keeps all.

    Returns:
        ``(images, labels)``: ``uint8`` arrays of shape ``(N, 28, 28)`` (pixel values 0..255) and
        ``(N,)`` (class ids 0..9; names in :func:`fashion_mnist_classes`).

    Raises:
        SlimformerError (a ``ValueError``): unknown split or negative ``limit``.
    """
    if split not in ("train", "test"):
        raise SlimformerError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 0:
        raise SlimformerError(f"limit must be >= 0 or None, got {limit}")
    with np.load(FASHION_MNIST_FILE) as archive:
        images = archive[f"{split}_images"]
        labels = archive[f"{split}_labels"]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def fashion_mnist_classes() -> list[str]:
    """The 10 Fashion-MNIST class names, indexed by label (``0 -> "T-shirt/top"``)."""
    with np.load(FASHION_MNIST_FILE) as archive:
        return [str(name) for name in archive["classes"]]
