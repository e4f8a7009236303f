"""Regenerate the small data samples shipped in ``slimformer/data``.

Sources (Debian packages, installed system-wide):

* ``fortunes`` / ``fortunes-min`` (source package ``fortune-mod``): plain-text fortune files in
  ``/usr/share/games/fortunes``, entries separated by lines holding only ``%``.
  Output: ``slimformer/data/fortunes.jsonl`` (one ``{"text", "category"}`` object per line).
* Python 3.11's standard library (PSF license; ``/usr/lib/python3.11/LICENSE.txt``): paragraphs of the
  docstrings of a fixed list of modules, a second real text domain (technical English) unlike the fortunes.
  Output: ``slimformer/data/python_docs.jsonl`` (one ``{"text", "module"}`` object per line).
* ``dataset-fashion-mnist``: the Fashion-MNIST IDX files in ``/usr/share/datasets/fashion-mnist``.
  Output: ``slimformer/data/fashion_mnist_sample.npz`` (first 2,000 train and 1,000 test images).

The output is deterministic: running this script twice gives byte-identical ``fortunes.jsonl``
and identical arrays in the ``.npz``.

Usage::

    python benchmarks/make_data_samples.py [--fortunes-dir DIR] [--fashion-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from slimformer.data.debian_fortunes import DEFAULT_FORTUNES_DIR, collect_fortunes  # the cleaning rules

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "slimformer" / "data"
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Fortune sampling parameters.
SEED = 0
TARGET_FORTUNES = 1200

# Fashion-MNIST sample sizes and class names (in label order, from the Fashion-MNIST README).
N_TRAIN_IMAGES = 2000
N_TEST_IMAGES = 1000
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# ----------------------------------------------------------------------------------------------
# fortunes


def per_category_quota(sizes: dict[str, int], target: int) -> dict[str, int]:
    """Stratified quota: the same cap for every category (water-filling), exactly ``target`` in total.

    Small categories are taken whole; the cap is the smallest value whose total reaches ``target``,
    and any surplus is removed one entry at a time from the capped categories in name order.
    """
    total = sum(sizes.values())
    if total <= target:
        return dict(sizes)
    cap = 0
    while sum(min(n, cap) for n in sizes.values()) < target:
        cap += 1
    quota = {name: min(n, cap) for name, n in sizes.items()}
    surplus = sum(quota.values()) - target
    for name in sorted(quota):
        if surplus == 0:
            break
        if quota[name] == cap:
            quota[name] -= 1
            surplus -= 1
    return quota


def sample_fortunes(by_category: dict[str, list[str]], target: int, seed: int) -> list[dict[str, str]]:
    """Stratified, seeded sample of ``target`` fortunes, shuffled deterministically."""
    rng = random.Random(seed)
    quota = per_category_quota({name: len(texts) for name, texts in by_category.items()}, target)
    rows: list[dict[str, str]] = []
    for name in sorted(by_category):
        texts = by_category[name]
        picked = sorted(rng.sample(range(len(texts)), quota[name]))
        rows.extend({"text": texts[i], "category": name} for i in picked)
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Iterable[dict[str, str]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Python standard-library docstrings

DOC_MODULES = (
    "os", "os.path", "shutil", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess",
    "socket", "threading", "random", "statistics", "string", "textwrap", "datetime", "calendar", "decimal",
    "fractions", "math", "heapq", "bisect", "csv", "zipfile", "tarfile", "gzip", "hashlib", "logging", "argparse",
    "unittest", "inspect", "typing", "email", "urllib.parse", "http.client", "sqlite3", "tempfile", "glob",
    "fnmatch", "difflib", "pprint", "enum", "dataclasses", "asyncio", "contextlib", "copy", "abc", "io", "struct",
    "codecs", "locale", "gettext", "configparser", "operator", "pickle", "shelve", "queue", "sched", "selectors",
    "signal", "mmap", "ssl", "base64", "binascii", "html", "html.parser", "xml.dom.minidom", "xml.etree.ElementTree",
    "wave", "colorsys", "imaplib", "smtplib", "ftplib", "poplib", "uuid", "ipaddress", "numbers", "cmath", "array",
    "weakref", "types", "traceback", "warnings", "timeit", "trace", "tokenize", "ast", "dis", "pdb", "doctest",
    "zoneinfo", "graphlib", "secrets", "hmac", "platform", "sysconfig", "importlib", "pkgutil", "runpy", "netrc",
    "mailbox", "mimetypes", "quopri", "shlex", "filecmp", "fileinput", "stat", "linecache", "reprlib", "turtle",
)
MAX_DOC_TEXTS = 1200


def docstring_paragraphs(modules: Iterable[str], limit: int) -> list[dict[str, str]]:
    """Paragraphs (40-400 characters, whitespace-normalised, de-duplicated) of the public docstrings of
    ``modules``, in module order then attribute order; every k-th is kept so at most ``limit`` remain."""
    import importlib
    import inspect

    seen: dict[str, str] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # optional modules (turtle needs tkinter)
            continue
        for attr in ["", *sorted(dir(mod))]:
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None) if attr else mod)
            for para in (doc or "").split("\n\n")[:2]:
                text = " ".join(para.split())
                if 40 <= len(text) <= 400 and sum(c.isalpha() for c in text) > len(text) // 2 and ">>>" not in text:
                    seen.setdefault(text, name)
    rows = [{"text": text, "module": module} for text, module in seen.items()]
    return rows[:: max(1, -(-len(rows) // limit))][:limit]


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (the MNIST / Fashion-MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: header says {shape}, found {array.size} bytes of data")
    return array.reshape(shape)


def make_fashion_sample(fashion_dir: Path, out: Path) -> dict[str, tuple[int, ...]]:
    train_images = read_idx(fashion_dir / "train-images-idx3-ubyte.gz")[:N_TRAIN_IMAGES]
    train_labels = read_idx(fashion_dir / "train-labels-idx1-ubyte.gz")[:N_TRAIN_IMAGES]
    test_images = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")[:N_TEST_IMAGES]
    test_labels = read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz")[:N_TEST_IMAGES]
    arrays = {
        "train_images": np.ascontiguousarray(train_images, dtype=np.uint8),
        "train_labels": np.ascontiguousarray(train_labels, dtype=np.uint8),
        "test_images": np.ascontiguousarray(test_images, dtype=np.uint8),
        "test_labels": np.ascontiguousarray(test_labels, dtype=np.uint8),
        "classes": np.array(FASHION_CLASSES, dtype=np.str_),
    }
    np.savez_compressed(out, **arrays)
    return {name: a.shape for name, a in arrays.items()}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fortunes-dir", type=Path, default=DEFAULT_FORTUNES_DIR)
    parser.add_argument("--fashion-dir", type=Path, default=DEFAULT_FASHION_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    by_category = collect_fortunes(args.fortunes_dir)
    rows = sample_fortunes(by_category, TARGET_FORTUNES, SEED)
    fortunes_path = args.out / "fortunes.jsonl"
    write_jsonl(rows, fortunes_path)
    n_categories = len({row["category"] for row in rows})
    print(
        f"{fortunes_path}: {len(rows)} fortunes from {n_categories} categories "
        f"({sum(len(t) for t in by_category.values())} eligible), {fortunes_path.stat().st_size} bytes"
    )

    doc_rows = docstring_paragraphs(DOC_MODULES, MAX_DOC_TEXTS)
    docs_path = args.out / "python_docs.jsonl"
    write_jsonl(doc_rows, docs_path)
    print(f"{docs_path}: {len(doc_rows)} docstring paragraphs, {docs_path.stat().st_size} bytes")

    fashion_path = args.out / "fashion_mnist_sample.npz"
    shapes = make_fashion_sample(args.fashion_dir, fashion_path)
    print(f"{fashion_path}: {shapes}, {fashion_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
