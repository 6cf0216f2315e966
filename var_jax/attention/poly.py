"""The polynomial method (Alman & Song 2023, used by the VAR complexity paper): low-rank softmax.

exp(x) on the logit interval [-b, b] is replaced by a degree-g polynomial p(x) = sum_t a_t x^t, and
p(q . k) is factored exactly with symmetric monomial features:

    (q . k)^t = sum_{|alpha| = t} (t! / alpha!) q^alpha k^alpha,
    phi_q(q)_alpha = sign(a_t) sqrt(|a_t| t! / alpha!) q^alpha,
    phi_k(k)_alpha =           sqrt(|a_t| t! / alpha!) k^alpha,

so phi_q(q) . phi_k(k) = p(q . k) with rank M = binom(D + g, g) (all multi-indices of degree <= g;
the signs of the coefficients stay on the query side so the key-side sums are the same for every
query). If p has relative error eps on [-b, b], every attention weight has relative error eps and
the output error is at most 2 eps / (1 - eps) max|v| (the normalisation bound). When p is exact
(logits inside a range where the fit is exact to rounding) the backend equals exact attention.

Polynomials: "taylor" around ``center`` (0 by default); an *even*-degree Taylor polynomial is
positive on the whole real line, so the normaliser stays positive even for logits outside [-b, b].
``center = -b`` is the shifted form e^x = e^-b e^(x+b) whose relative error on [-b, b] is
P(Poisson(x + b) > g) <= (2b)^(g+1)/(g+1)! and is better for large b. "chebyshev": interpolation
of exp at the Chebyshev points of [-b, b] (near-minimax in absolute error); needs ``logit_bound``.

Two forms of the same function: "features" (the low-rank factorisation above, O(L M D) time)
and "kernel" (`kernel_attention`: p applied to the masked L x L logits, O(L^2 D)). The paper's
speed-up is the features form for L >> M; when L < M (the demo VAR: L = 130 against M = 2145 at
D = 64, g = 2) the kernel form computes the identical attention much faster, which is how a
model is *trained* with poly attention at small L. Decoding always runs the features form.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales
from var_jax.attention import prefix

APPROXIMATIONS = ("taylor", "chebyshev")
FORMS = ("features", "kernel")


def exp_poly_coefficients(degree, approximation="taylor", *, center=0.0, logit_bound=None):
    """Monomial coefficients a_0..a_g (float64) of a polynomial p(x) ~ exp(x)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")
    if approximation == "taylor":
        coeffs = np.zeros(degree + 1)
        for t in range(degree + 1):
            for s in range(t + 1):
                coeffs[s] += math.exp(center) / math.factorial(t) * math.comb(t, s) * (
                    -center) ** (t - s)
        return coeffs
    if approximation == "chebyshev":
        if logit_bound is None or not logit_bound > 0:
            raise ValueError(f"logit_bound must be a positive number for the chebyshev "
                             f"approximation, got {logit_bound!r}")
        cheb = np.polynomial.Chebyshev.interpolate(np.exp, degree,
                                                   domain=[-logit_bound, logit_bound])
        coeffs = cheb.convert(kind=np.polynomial.Polynomial, domain=[-1, 1],
                              window=[-1, 1]).coef
        return np.pad(coeffs, (0, degree + 1 - len(coeffs)))
    raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")


def relative_error(coeffs, logit_bound, num_points=20001):
    """max over a dense grid of [-b, b] of |p(x) e^-x - 1|: the entrywise relative error."""
    x = np.linspace(-logit_bound, logit_bound, num_points)
    return float(np.max(np.abs(np.polynomial.polynomial.polyval(x, coeffs) * np.exp(-x) - 1)))


def taylor_error_bound(degree, logit_bound, center=0.0):
    """Lagrange-remainder bound of the relative error of the Taylor polynomial on [-b, b].

    |e^x - T(x)| <= e^max(x, c) |x - c|^(g+1) / (g+1)!, so relative error
    <= e^max(0, c - x) |x - c|^(g+1)/(g+1)!, maximised at an end point of [-b, b].
    """
    worst = 0.0
    for x in (-logit_bound, logit_bound):
        worst = max(worst, math.exp(max(0.0, center - x)) * abs(x - center) ** (degree + 1)
                    / math.factorial(degree + 1))
    return worst


def rank(head_dim, degree):
    """binom(D + g, g): the number of monomials of degree <= g in D variables."""
    return math.comb(head_dim + degree, degree)


@functools.lru_cache(maxsize=64)
def _multi_indices(head_dim, t):
    """Sorted index tuples (R_t, t) and sqrt(t!/alpha!) for every multi-index of degree t."""
    if t == 0:
        combos = np.zeros((1, 0), np.int32)
    else:
        combos = np.array(list(itertools.combinations_with_replacement(range(head_dim), t)),
                          dtype=np.int32)
    weights = np.empty(len(combos))
    for r, combo in enumerate(combos):
        denom = 1
        for _, group in itertools.groupby(combo):
            denom *= math.factorial(len(list(group)))
        weights[r] = math.sqrt(math.factorial(t) / denom)
    combos.setflags(write=False)
    weights.setflags(write=False)
    return combos, weights


def monomial_features(x_xD, coeffs, *, query_side):
    """phi_q (query_side=True, carries the coefficient signs) or phi_k of the module docstring.

    The degree-t monomials are products of t gathered columns (one gather per factor, fused
    with the product: measured faster on CPU than one (.., R, t) gather or a concatenation).
    """
    head_dim = x_xD.shape[-1]
    feats = []
    for t, a_t in enumerate(np.asarray(coeffs, np.float64)):
        if a_t == 0:
            continue
        idx, weights = _multi_indices(head_dim, t)
        scale = math.sqrt(abs(a_t)) * weights * (np.sign(a_t) if query_side else 1.0)
        scale = jnp.asarray(scale, x_xD.dtype)
        if t == 0:
            feats.append(jnp.broadcast_to(scale, (*x_xD.shape[:-1], 1)))
            continue
        mono = jnp.take(x_xD, jnp.asarray(idx[:, 0]), axis=-1)
        for j in range(1, t):
            mono = mono * jnp.take(x_xD, jnp.asarray(idx[:, j]), axis=-1)
        feats.append(mono * scale)
    return jnp.concatenate(feats, axis=-1)


def feature_map(head_dim, *, degree=2, approximation="taylor", center=0.0, logit_bound=None):
    """The prefix-core FeatureMap of the polynomial method."""
    coeffs = exp_poly_coefficients(degree, approximation, center=center, logit_bound=logit_bound)
    num_features = sum(math.comb(head_dim + t - 1, t) for t, a in enumerate(coeffs) if a != 0)

    def query(x):
        return monomial_features(x, coeffs, query_side=True)

    def key(x):
        return monomial_features(x, coeffs, query_side=False)

    return prefix.FeatureMap(num_features, query, key)


def kernel_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, patch_nums, coeffs):
    """The block-causal poly attention in its kernel form: weights p(q . k) on the masked L x L
    logits, normalised by their row sums. The same function as the features form (a
    factorisation of exactly these weights), without the log-stabiliser, which only rescales
    numerator and denominator together. Memory O(L^2): for the short sequences it is for."""
    dtype = q_BxLxHxD.dtype
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2)
               for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision=jax.lax.Precision.HIGHEST)
    weights = jnp.zeros_like(logits)
    for a_t in np.asarray(coeffs, np.float64)[::-1]:  # Horner
        weights = weights * logits + np.float32(a_t)
    weights = jnp.where(scales.block_causal_mask(patch_nums), weights, 0.0)
    out = jnp.matmul(weights, v, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(dtype)
