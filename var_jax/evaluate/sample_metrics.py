"""Scores for class-conditional samples with the project's classifier.

`conditional_accuracy`: the fraction of samples the classifier assigns to their conditioning
class. `classifier_frechet`: the Frechet distance between classifier features of real and
generated images (an FID analogue in a space that was trained on the same data).
`class_spread_ratio`: how varied the samples of one class are against real images of that class,
in the same features (1: as varied; below 1: too uniform, as guidance makes them). The Frechet
distance says how far the two sets are; this says in which direction, within classes.
`frechet_reference`: what class-conditional samples are measured against: the statistics of a
whole split, less a held-out set of real images with the samples' own label mix, which gives the
distance real images of that mix reach (the floor set by the sample count).
"""

from __future__ import annotations

from typing import NamedTuple

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


def matched_real_indices(real_labels_N, labels_M) -> np.ndarray:
    """Indices of real images whose labels are `labels_M` position by position, each class's
    images taken in their order: real images with exactly the samples' label mix."""
    real, want = np.asarray(real_labels_N), np.asarray(labels_M)
    out = np.empty(len(want), np.int64)
    for c in np.unique(want):
        slots, pool = np.flatnonzero(want == c), np.flatnonzero(real == c)
        if len(pool) < len(slots):
            raise ValueError(f"class {int(c)}: the samples have {len(slots)} images of it, the "
                             f"real set only {len(pool)}")
        out[slots] = pool[:len(slots)]
    return out


class FrechetReference(NamedTuple):
    """Classifier features for scoring class-conditional samples (see `frechet_reference`)."""
    features_NxM: np.ndarray  # the reference statistics: the split less the held-out images
    labels_N: np.ndarray
    held_out_features_KxM: np.ndarray  # real images with the samples' label mix

    def distance(self, samples_KxM) -> float:
        return frechet.frechet_distance(self.features_NxM, samples_KxM)

    def real_floor(self) -> float:
        """The distance of held-out real images with the samples' label mix: what a perfect
        sampler would score with this many samples."""
        return self.distance(self.held_out_features_KxM)

    def spread_ratio(self, samples_KxM, labels_K) -> float:
        return spread_ratio_of_features(self.features_NxM, self.labels_N, samples_KxM, labels_K)


def frechet_reference(model, real_NxHxWx3, real_labels_N, labels_K) -> FrechetReference:
    """The reference for samples drawn with labels `labels_K`, from a whole split's real images in
    [-1, 1]: its statistics over all images but a held-out set with the samples' label mix.

    Why not the first K images of the split: a K-image reference adds its own sampling noise
    and its class mix to every distance (on Fashion-MNIST with K = 500 the first 500 test
    images sit 4.0 from the whole split's statistics, other 500-image sets 1.5-2.1, and the
    same samples scored 7.8-11.4 against six such sets: docs/demo_results.md, 2026-12-07)."""
    labels_N = np.asarray(real_labels_N)
    held_out = matched_real_indices(labels_N, labels_K)
    rest = np.setdiff1d(np.arange(len(labels_N)), held_out)
    if len(rest) < len(held_out):
        raise ValueError(f"the split has {len(labels_N)} images: too few for a reference beside "
                         f"{len(held_out)} held-out ones")
    features = real_features(model, real_NxHxWx3)
    return FrechetReference(features[rest], labels_N[rest], features[held_out])
