"""The full Fashion-MNIST (60,000 train / 10,000 test images) from Debian's ``dataset-fashion-mnist``
package (IDX gzip files under ``/usr/share/datasets/fashion-mnist``), next to the packaged sample
(``slimformer.data.load_fashion_mnist``), and the names and normalisation of the image data source."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from slimformer.errors import SlimformerError

__all__ = ["DEBIAN_FASHION_MNIST_DIR", "FMNIST_MEAN", "FMNIST_STD", "IMAGE_SOURCES", "load_full_fashion_mnist",
           "load_train_images", "read_idx"]

IMAGE_SOURCES: tuple[str, ...] = ("fashion-mnist", "fashion_mnist")
"""Names of the Fashion-MNIST data source (the first is the canonical one)."""
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed): magic 0x0000, dtype code, rank, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SlimformerError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise SlimformerError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims, dtype=np.int64)) if ndim else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise SlimformerError(f"{path}: IDX header says {dims} of {dtype}, but the data holds "
                              f"{len(raw) - offset} bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return data.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else data.copy()


def load_full_fashion_mnist(split: str, root: Path = DEBIAN_FASHION_MNIST_DIR
                            ) -> tuple[np.ndarray, np.ndarray] | None:
    """The full Fashion-MNIST split from IDX gzip files in `root` (Debian's package), or None if absent."""
    if split not in _IDX_FILES:
        raise SlimformerError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    img_file, lab_file = (Path(root) / name for name in _IDX_FILES[split])
    if not (img_file.is_file() and lab_file.is_file()):
        return None
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise SlimformerError(f"{img_file}: expected (N, 28, 28) images and (N,) labels, got "
                              f"{images.shape} and {labels.shape}")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def load_train_images(limit: int | None = None) -> np.ndarray:
    """Training images for recovery: Debian's full 60,000 when installed, else the packaged 2,000 (never
    the test images fidelity is measured on)."""
    from slimformer.data import load_fashion_mnist

    full = load_full_fashion_mnist("train")
    x, _ = full if full is not None else load_fashion_mnist("train")
    return x if limit is None else x[:limit]
