"""The polynomial method and FAVOR+ against their theory."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _attention_helpers import LAYOUT, PATCH_NUMS, call, qkv, reference

from var_jax import attention, scales
from var_jax.attention import favor, poly


def test_poly_coefficients():
    taylor = poly.exp_poly_coefficients(4)
    np.testing.assert_allclose(taylor, [1 / math.factorial(t) for t in range(5)])
    shifted = poly.exp_poly_coefficients(4, center=-1.5)
    x = np.linspace(-1.5, 1.5, 7)
    want = math.exp(-1.5) * sum((x + 1.5) ** t / math.factorial(t) for t in range(5))
    np.testing.assert_allclose(np.polynomial.polynomial.polyval(x, shifted), want, rtol=1e-12)
    cheb = poly.exp_poly_coefficients(6, "chebyshev", logit_bound=2.0)
    assert poly.relative_error(cheb, 2.0) < poly.relative_error(
        poly.exp_poly_coefficients(6), 2.0)
    for g in (2, 4, 6):  # the Lagrange bound is a bound
        for center in (0.0, -2.0):
            coeffs = poly.exp_poly_coefficients(g, center=center)
            assert poly.relative_error(coeffs, 2.0) <= poly.taylor_error_bound(g, 2.0, center)


def test_poly_features_reproduce_the_polynomial():
    x = jax.random.normal(jax.random.key(4), (1, 5, 1, 4)) * 0.7
    y = jax.random.normal(jax.random.key(5), (1, 6, 1, 4)) * 0.7
    for approx, kwargs in (("taylor", {"center": 0.0}), ("taylor", {"center": -1.0}),
                           ("chebyshev", {"logit_bound": 2.0})):
        coeffs = poly.exp_poly_coefficients(5, approx, **kwargs)
        fq = poly.monomial_features(x, coeffs, query_side=True)[0, :, 0]
        fk = poly.monomial_features(y, coeffs, query_side=False)[0, :, 0]
        assert fq.shape[-1] == math.comb(4 + 5, 5) == poly.rank(4, 5)
        dots = np.asarray(x[0, :, 0], np.float64) @ np.asarray(y[0, :, 0], np.float64).T
        want = np.polynomial.polynomial.polyval(dots, coeffs)
        np.testing.assert_allclose(np.asarray(fq @ fk.T), want, rtol=2e-5, atol=2e-6)


def _poly_error(temperature, degree, **options):
    q, k, v = qkv(seed=6, temperature=temperature, head_dim=4)
    out = call(q, k, v, "poly", degree=degree, **options)
    return np.abs(np.asarray(out, np.float64) - reference(q, k, v)).max() / np.abs(v).max()


def test_poly_error_follows_theory():
    bound = 2.0
    degrees = (2, 4, 6, 8)
    by_degree = [_poly_error(bound, g) for g in degrees]
    assert all(a > b for a, b in zip(by_degree, by_degree[1:], strict=False)), by_degree
    by_bound = [_poly_error(b, 4) for b in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(by_bound, by_bound[1:], strict=False)), by_bound
    for g, err in zip(degrees, by_degree, strict=True):
        entry = poly.taylor_error_bound(g, bound)
        assert entry >= 1 or err <= 2 * entry / (1 - entry), (g, err, entry)
    # What plan promises at its certified degree holds on data at that bound.
    for eps in (1e-2, 1e-4):
        p = attention.plan(bound, 4, LAYOUT.seq_len, eps)
        assert p.certified and p.entry_error <= eps
        measured = _poly_error(bound, p.degree, center=p.center)
        assert measured <= p.predicted_error, (eps, p, measured)
    cheb = poly.exp_poly_coefficients(6, "chebyshev", logit_bound=bound)
    eps_cheb = poly.relative_error(cheb, bound)
    measured = _poly_error(bound, 6, approximation="chebyshev", logit_bound=bound)
    assert measured <= 2 * eps_cheb / (1 - eps_cheb)
    assert measured < by_degree[2]  # Chebyshev beats Taylor at the same degree


def test_poly_exact_to_rounding_when_the_polynomial_is():
    # At logit bound 0.05 the degree-8 Taylor polynomial equals exp to ~1e-17.
    q, k, v = qkv(seed=12, temperature=0.05, head_dim=4)
    out = call(q, k, v, "poly", degree=8)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6)


def test_favor_unbiased_and_error_falls_like_inverse_sqrt_m():
    x = jnp.array([[0.6, -0.3, 0.2, 0.1]])
    y = jnp.array([[0.1, 0.5, -0.4, 0.3], [-0.5, -0.2, 0.3, -0.4]])
    target = np.exp(np.asarray(x @ y.T, np.float64))[0]
    draws = 4000
    keys = jax.random.split(jax.random.key(7), draws)

    def estimates(num_features, orthogonal):
        def one(key):
            w = favor.draw_projection(key, num_features, 4, orthogonal=orthogonal)
            return (favor.positive_features(x, w) @ favor.positive_features(y, w).T)[0]
        return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)  # (draws, 2)

    rms = {}
    for orthogonal, sizes in ((False, (4, 16, 64)), (True, (16,))):
        for m in sizes:
            est = estimates(m, orthogonal)
            mean, sem = est.mean(0), est.std(0) / math.sqrt(draws)
            assert np.all(np.abs(mean - target) < 4 * sem), (m, orthogonal, mean, target)
            rms[orthogonal, m] = np.sqrt(((est - target) ** 2).mean())
    for m in (4, 16):  # iid features: MSE = variance / M, so RMS halves per 4x features
        assert 1.7 < rms[False, m] / rms[False, 4 * m] < 2.3, rms
    assert rms[True, 16] < 1.05 * rms[False, 16], rms  # orthogonal features do no worse


def test_orthogonal_blocks_are_the_sign_fixed_q_factor():
    a = jax.random.normal(jax.random.key(1), (3, 64, 64))
    q = np.asarray(jax.jit(favor.orthonormal_columns)(a), np.float64)
    q_ref, r_ref = np.linalg.qr(np.asarray(a, np.float64))  # float64 reference
    q_ref = q_ref * np.sign(np.diagonal(r_ref, axis1=-2, axis2=-1))[:, None, :]
    np.testing.assert_allclose(q, q_ref, atol=1e-5)
    gram = np.einsum("bdk,bdl->bkl", q, q)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(64), gram.shape), atol=1e-5)


def test_looped_favor_model_does_not_hang():
    # Regression: with jnp.linalg.qr per layer, this jitted forward (6 looped layers) deadlocked
    # XLA:CPU on every run on a 2-core machine. A subprocess, so a hang fails instead of blocking.
    code = ("import jax, jax.numpy as jnp\n"
            "from flax import nnx\n"
            "from var_jax.models.var import VAR, VARConfig\n"
            "cfg = VARConfig(depth=6, width=128, num_heads=2, patch_nums=(1, 2, 3, 4, 6, 8),\n"
            "                vocab_size=512, cvae=16, num_classes=10, scan_layers=False,\n"
            "                attn_backend='favor', attn_options={'num_features': 128})\n"
            "gd, st = nnx.split(VAR(cfg, rngs=nnx.Rngs(0)))\n"
            "f = jax.jit(lambda st, x: nnx.merge(gd, st)(jnp.zeros(8, jnp.int32), x))\n"
            "print(float(f(st, jnp.zeros((8, 129, 16))).sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and np.isfinite(float(out.stdout.split()[-1])), out.stderr[-2000:]


def test_favor_attention_error_falls_with_features():
    q, k, v = qkv(seed=8, temperature=0.5)
    ref = reference(q, k, v)
    errs = []
    for m in (64, 1024):
        outs = [np.asarray(call(q, k, v, "favor", seed=s, num_features=m)) for s in range(4)]
        errs.append(np.mean([np.sqrt(((o - ref) ** 2).mean()) for o in outs]))
    assert errs[1] < errs[0] / 2.5, errs  # 1/sqrt(M) predicts a factor of 4
    assert errs[1] < 0.03


def test_favor_stabiliser_keeps_large_logits_finite():
    # Logits up to 60: unstabilised features would overflow float32 (e^60 * e^60).
    q, k, v = qkv(seed=15, temperature=60.0)
    k = k * 1.0
    out = np.asarray(call(q, k, v, "favor"))
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() <= np.abs(np.asarray(v)).max() * (1 + 1e-5)  # convex combination


def _poly_reference(q, k, v, coeffs, patch_nums=PATCH_NUMS):
    """Block-causal attention with weights p(q . k) in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    w = np.polynomial.polynomial.polyval(np.einsum("bqhd,bkhd->bhqk", q, k), coeffs)
    w = np.where(scales.block_causal_mask(patch_nums), w, 0.0)
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def test_poly_kernel_form_is_the_features_form():
    # Both forms against the float64 polynomial-weight attention, and their gradients equal.
    q, k, v = qkv(seed=21, temperature=1.5)
    for options in ({"degree": 2}, {"degree": 4, "center": -1.5},
                    {"degree": 4, "approximation": "chebyshev", "logit_bound": 1.5}):
        coeffs = poly.exp_poly_coefficients(
            options["degree"], options.get("approximation", "taylor"),
            center=options.get("center", 0.0), logit_bound=options.get("logit_bound"))
        want = _poly_reference(q, k, v, coeffs)
        outs = {form: np.asarray(call(q, k, v, "poly", form=form, **options), np.float64)
                for form in poly.FORMS}
        for form, out in outs.items():
            np.testing.assert_allclose(out, want, atol=2e-5, err_msg=f"{form} {options}")

        def loss(q, k, v, form, options=options):
            out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="poly",
                                                   form=form, **options)
            return jnp.sum(jnp.sin(out))
        grads = {form: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, form)
                 for form in poly.FORMS}
        for a, b in zip(grads["features"], grads["kernel"], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    try:
        call(q, k, v, "poly", form="dense")
    except ValueError as err:
        assert "form must be one of" in str(err)
    else:
        raise AssertionError("an unknown form was accepted")
