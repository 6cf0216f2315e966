"""Frechet distance between two Gaussians fitted to feature sets (the FID formula), in float64
numpy with symmetric eigendecompositions instead of scipy's sqrtm.

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2); the trace term uses the
identity tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric PSD.
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_stats(features_NxM) -> tuple[np.ndarray, np.ndarray]:
    """(mean (M,), covariance (M, M)) in float64; needs at least 2 rows."""
    x = np.asarray(features_NxM, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: expected (N >= 2, M), found shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or \
            sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"stats: expected matching (M,) means and (M, M) covariances, found "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    s1 = _psd_sqrt(sigma1)
    inner = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    return float(max(d2, 0.0))


def frechet_distance(features_a_NxM, features_b_NxM) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance_from_stats(*gaussian_stats(features_a_NxM),
                                       *gaussian_stats(features_b_NxM))
