"""FID from Inception-v3 pool features.

var_jax does not include an Inception-v3 network yet, so `inception_features` raises a clear
NotImplementedError instead of returning made-up features. `fid_from_features` works today for
features computed elsewhere (for example the OpenAI ADM evaluator's reference batches).
"""

from __future__ import annotations

import os

import numpy as np

from var_jax.evaluate import frechet


def inception_features(images_BxHxWx3, weights_path: str) -> np.ndarray:
    """Not available: raises NotImplementedError (after checking the weights path)."""
    if not weights_path or not os.path.exists(weights_path):
        raise ValueError(f"weights_path: expected an existing Inception weights file, found "
                         f"{weights_path!r}")
    raise NotImplementedError(
        "Inception-v3 FID is not available in var_jax: no Inception network is implemented "
        "yet. Compute pool features with an external evaluator and call fid_from_features, or "
        "use var_jax.evaluate.sample_metrics (Frechet distance in the project's classifier "
        "features).")


def fid_from_features(real_NxM, generated_NxM) -> float:
    return frechet.frechet_distance(real_NxM, generated_NxM)


def fid_from_reference_npz(reference_path: str, generated_NxM) -> float:
    """FID against an ADM-style reference .npz holding 'mu' and 'sigma' of real features."""
    with np.load(reference_path) as ref:
        if "mu" not in ref or "sigma" not in ref:
            raise ValueError(f"reference_path: expected arrays 'mu' and 'sigma' in "
                             f"{reference_path!r}, found {sorted(ref.files)}")
        mu, sigma = ref["mu"], ref["sigma"]
    mu2, sigma2 = frechet.gaussian_stats(generated_NxM)
    return frechet.frechet_distance_from_stats(mu, sigma, mu2, sigma2)
