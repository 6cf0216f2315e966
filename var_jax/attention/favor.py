"""FAVOR+ (Choromanski et al. 2021): positive orthogonal random features for exp(q . k).

phi(x) = exp(W x - |x|^2 / 2) / sqrt(M) with rows of W ~ N(0, I_D) gives
E[phi(x) . phi(y)] = exp(x . y) (unbiased), and positive features keep every attention weight and
normaliser positive. Orthogonal rows (blocks of Q factors of Gaussian matrices, rescaled by
chi-distributed norms so every row is still marginally N(0, I)) lower the variance. The logits are
already q . k here (the caller scales), so no d^(-1/4) normaliser is applied.

Stabilisers, in float32: the query features are divided by their per-row max (a per-query constant
cancels in the normalisation); the key features by exp(c), c the running max over the keys seen so
far of every (batch, head) (see `prefix`), under stop_gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from var_jax import checks
from var_jax.attention import prefix


def orthonormal_columns(a_BxDxD):
    """The Q factor of a = QR with R's diagonal positive (Haar-distributed for Gaussian a), by
    Gram-Schmidt with one re-orthogonalisation pass (CGS2, orthogonal to float32 rounding).

    Plain jnp ops on purpose, not `jnp.linalg.qr`: on XLA:CPU (jax 0.10) a jitted program with
    several independent LAPACK QR calls (one per layer of a looped favor model) can deadlock
    under the concurrency-optimised scheduler; a 6-layer favor VAR hung on every run.
    """
    d = a_BxDxD.shape[-1]
    col = jnp.arange(d)

    def step(j, q_BxDxD):
        v = a_BxDxD[..., j]
        done = (col < j).astype(q_BxDxD.dtype)  # columns already orthonormal
        for _ in range(2):
            coeff = jnp.einsum("bdk,bd->bk", q_BxDxD, v, precision=jax.lax.Precision.HIGHEST)
            v = v - jnp.einsum("bdk,bk->bd", q_BxDxD, coeff * done,
                               precision=jax.lax.Precision.HIGHEST)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        return q_BxDxD.at[..., j].set(v)

    return jax.lax.fori_loop(0, d, step, jnp.zeros_like(a_BxDxD))


def draw_projection(rng, num_features, head_dim, *, orthogonal=True):
    """W of shape (M, D) float32, rows marginally N(0, I_D)."""
    checks.positive_int("num_features", num_features)
    if rng is None:
        raise ValueError("rng: the favor backend draws random features and needs a jax.random "
                         "key, got None")
    if not orthogonal:
        return jax.random.normal(rng, (num_features, head_dim), jnp.float32)
    num_blocks = math.ceil(num_features / head_dim)
    block_key, norm_key = jax.random.split(rng)
    gauss = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
    q_blocks = orthonormal_columns(gauss)
    rows = jnp.swapaxes(q_blocks, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim)), axis=-1)
    return rows * norms[:, None]


def _log_features(x_xD, w_MxD):
    proj = jnp.einsum("...d,md->...m", x_xD, w_MxD, precision=jax.lax.Precision.HIGHEST)
    return proj - 0.5 * jnp.sum(x_xD ** 2, axis=-1, keepdims=True)


def positive_features(x_NxD, w_MxD):
    """Unstabilised phi(x) (N, M), for tests of unbiasedness."""
    proj = x_NxD @ w_MxD.T - 0.5 * jnp.sum(x_NxD ** 2, axis=-1, keepdims=True)
    return jnp.exp(proj) / math.sqrt(w_MxD.shape[0])


def feature_map(w_MxD):
    w = w_MxD.astype(jnp.float32)

    def query(x):
        logf = _log_features(x, w)
        return jnp.exp(logf - jax.lax.stop_gradient(logf.max(axis=-1, keepdims=True)))

    def key(x):  # logs: the prefix core subtracts the running stabiliser before exp
        return _log_features(x, w)

    return prefix.FeatureMap(w.shape[0], query, key, log_domain=True)
