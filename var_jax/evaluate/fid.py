"""FID from Inception-v3 pool features.

`inception_features` runs the FID Inception network (var_jax.evaluate.inception, the 2015 TF
graph in pytorch-fid's weight layout) on images the user supplies weights for; var_jax ships no
weights. `fid_from_features` and `fid_from_reference_npz` work on features computed anywhere
(for example the OpenAI ADM evaluator's reference batches).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from var_jax.evaluate import frechet, inception


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, images_BxHxWx3, image_size):
    model = nnx.merge(graphdef, state)
    return model(inception.preprocess(images_BxHxWx3, image_size))


def inception_features(images_BxHxWx3, weights_path, batch_size: int = 50, *,
                       image_size: int = inception.FID_IMAGE_SIZE) -> np.ndarray:
    """Pool3 features (N, 2048) float64 of images (N, H, W, 3) NHWC in [0, 1] (floats; uint8
    images are read as [0, 255]).

    Images from ``[-1, 1]`` decoders must be mapped with ``(x + 1) / 2`` first (checked).
    ``weights_path`` is pytorch-fid's ``pt_inception-2015-12-05-*.pth`` or an .npz of the same
    keys, or a network already returned by ``inception.load_fid_inception``. ``image_size`` 299
    is the standard FID input; other sizes (>= 75) are for tests only. Batches are padded to
    ``batch_size`` so the network compiles once per input shape.
    """
    if isinstance(weights_path, inception.FIDInceptionV3):
        model = weights_path
    else:
        model = inception.load_fid_inception(weights_path)
    images = np.asarray(images_BxHxWx3)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images: expected (N >= 1, H, W, 3) NHWC, found shape {images.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3 or not np.isfinite(lo + hi):
        raise ValueError(f"images: expected values in [0, 1] (map [-1, 1] images with "
                         f"(x + 1) / 2), found range [{lo}, {hi}]")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, found {batch_size}")
    graphdef, state = nnx.split(model)
    n = images.shape[0]
    batch_size = min(batch_size, n)
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            pad = np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        feats = _forward(graphdef, state, chunk, image_size)
        out.append(np.asarray(feats, np.float64)[:real])
    return np.concatenate(out)


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
