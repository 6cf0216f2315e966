"""Scores for class-conditional samples with the project's classifier.

`conditional_accuracy`: the fraction of samples the classifier assigns to their conditioning
class. `classifier_frechet`: the Frechet distance between classifier features of real and
generated images (an FID analogue in a space that was trained on the same data).
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


def classifier_frechet(model, real_NxHxWx3, images01_NxHxWx3) -> float:
    """real images in [-1, 1], generated ones in [0, 1]."""
    real = classifier_lib.features(model, np.asarray(real_NxHxWx3, np.float32))
    fake = classifier_lib.features(model, to_model_range(images01_NxHxWx3))
    return frechet.frechet_distance(real, fake)
