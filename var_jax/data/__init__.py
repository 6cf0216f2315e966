"""Data sources (Fashion-MNIST IDX, scikit-learn digits, ImageNet-layout folders) and Grain
pipelines that yield {"image": float32 (B, H, W, 3) in [-1, 1], "label": int32 (B,)}."""

from var_jax.data.pipeline import (  # noqa: F401
    SOURCES,
    ArraySource,
    DataIterator,
    fit_to_size,
    make_dataset,
    make_source,
    normalize,
)
