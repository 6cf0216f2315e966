"""Scores for class-conditional samples with the project's classifier.

`conditional_accuracy`: the fraction of samples the classifier assigns to their conditioning
class. `classifier_frechet`: the Frechet distance between classifier features of real and
generated images (an FID analogue in a space that was trained on the same data).
`class_spread_ratio`: how varied the samples of one class are against real images of that class,
in the same features (1: as varied; below 1: too uniform, as guidance makes them). The Frechet
distance says how far the two sets are; this says in which direction, within classes.
"""

from __future__ import annotations

import numpy as np

from var_jax.evaluate import classifier as classifier_lib
from var_jax.evaluate import frechet


def to_model_range(images01_NxHxWx3) -> np.ndarray:
    """Samples in [0, 1] -> the classifier's [-1, 1] input range."""
    return np.asarray(images01_NxHxWx3, np.float32) * 2.0 - 1.0


def conditional_accuracy(model, images01_NxHxWx3, labels_N) -> float:
    return classifier_lib.accuracy(model, to_model_range(images01_NxHxWx3), labels_N)


def real_features(model, real_NxHxWx3) -> np.ndarray:
    """Classifier features of real images in [-1, 1]."""
    return classifier_lib.features(model, np.asarray(real_NxHxWx3, np.float32))


def sample_features(model, images01_NxHxWx3) -> np.ndarray:
    """Classifier features of samples in [0, 1]."""
    return classifier_lib.features(model, to_model_range(images01_NxHxWx3))


def classifier_frechet(model, real_NxHxWx3, images01_NxHxWx3) -> float:
    """real images in [-1, 1], generated ones in [0, 1]."""
    return frechet.frechet_distance(real_features(model, real_NxHxWx3),
                                    sample_features(model, images01_NxHxWx3))


def within_class_spread(features_NxM, labels_N) -> dict[int, float]:
    """The total variance of each class's features, tr(Cov_c) in float64, for every class with
    at least two examples."""
    x, y = np.asarray(features_NxM, np.float64), np.asarray(labels_N)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected features (N, M) and labels (N,), found {x.shape} and "
                         f"{y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    return {int(c): float(x[y == c].var(axis=0, ddof=1).sum())
            for c, n in zip(classes, counts, strict=True) if n >= 2}


def class_spread_ratio(model, real_NxHxWx3, real_labels_N, images01_NxHxWx3, labels_N) -> float:
    """Mean within-class feature variance of the samples over that of the real images (real in
    [-1, 1], samples in [0, 1]), over the classes with at least two examples in both sets."""
    return spread_ratio_of_features(real_features(model, real_NxHxWx3), real_labels_N,
                                    sample_features(model, images01_NxHxWx3), labels_N)


def spread_ratio_of_features(real_NxM, real_labels_N, samples_NxM, labels_N) -> float:
    """`class_spread_ratio` on features already computed (the demo scores each sample set's
    features once for the distance and the spread)."""
    real = within_class_spread(real_NxM, real_labels_N)
    fake = within_class_spread(samples_NxM, labels_N)
    common = sorted(set(real) & set(fake))
    if not common:
        raise ValueError(f"no class has two or more examples in both sets (real: "
                         f"{sorted(real)}, samples: {sorted(fake)})")
    return float(np.mean([fake[c] for c in common]) / np.mean([real[c] for c in common]))
