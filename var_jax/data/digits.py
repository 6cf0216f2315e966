"""scikit-learn's 8x8 digits: the fallback image source that needs no system package.

The 1,797 images are split deterministically (every fifth image per class to "test") so that
train and test are disjoint and balanced without any randomness.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = tuple(str(i) for i in range(10))


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 8, 8) in 0..255, labels int32 (N,))."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', found {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int32)
    rank = np.zeros_like(labels)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(where.size)
    is_test = rank % 5 == 4
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]
