"""Fashion-MNIST from its original IDX files (as shipped by Debian's `dataset-fashion-mnist`).

The IDX format is tiny (a magic number, big-endian dimensions, raw bytes), so reading it needs
only numpy and gzip: no download at run time and no extra dependency.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes -> numpy dtypes (big-endian where it matters).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {path!r} could not be read: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path!r}: expected magic 0x0000TTNN, found {data[:4]!r}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"IDX file {path!r}: header declares shape {shape} ({expected} bytes), "
            f"found {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def available(root: str = DEFAULT_ROOT) -> bool:
    return all(os.path.exists(os.path.join(root, f"{p}-{k}-ubyte.gz"))
               for p in _PREFIX.values() for k in ("images-idx3", "labels-idx1"))


def load(split: str, root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28), labels int32 (N,)) of split "train" or "test"."""
    if split not in _PREFIX:
        raise ValueError(f"split: expected one of {sorted(_PREFIX)}, found {split!r}")
    prefix = os.path.join(root, _PREFIX[split])
    images_path = f"{prefix}-images-idx3-ubyte.gz"
    if not os.path.exists(images_path):
        raise ValueError(
            f"Fashion-MNIST not found under {root!r} (expected {os.path.basename(images_path)}); "
            "install the Debian package dataset-fashion-mnist or use data.source='digits'")
    images = read_idx(images_path)
    labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels "
                         f"{labels.shape} do not match")
    return images, labels
