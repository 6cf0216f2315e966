"""Block-causal attention backends against float64 references and their invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import attention, scales
from var_jax.attention import favor, poly

PATCH_NUMS = (1, 2, 3, 4)
LAYOUT = scales.token_layout(PATCH_NUMS)
B, H, D = 2, 2, 8
LOW_RANK_OPTIONS = {"exact": {}, "flash": {}, "poly": {"degree": 4},
                    "favor": {"num_features": 64}}
ALL = tuple(LOW_RANK_OPTIONS)


def _qkv(seed=0, temperature=None, head_dim=D, batch=B, heads=H):
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, LAYOUT.seq_len, heads, head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    if temperature is not None:  # VAR's attn_l2_norm: |q . k| <= temperature
        q = temperature * q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return q, k, v


def _reference(q, k, v, patch_nums=PATCH_NUMS):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = scales.block_causal_mask(patch_nums)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _call(q, k, v, backend, seed=1, **options):
    opts = dict(LOW_RANK_OPTIONS[backend], **options)
    return attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend,
                                            rng=jax.random.key(seed), **opts)


@pytest.mark.parametrize("query_block", [None, 7])
def test_exact_matches_float64_reference(query_block):
    q, k, v = _qkv(temperature=5.0)
    ref = _reference(q, k, v)
    out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="exact",
                                           query_block=query_block)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    rel = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert rel < 1e-5


@pytest.mark.parametrize("group_tokens", [1, 14, 256])
def test_flash_equals_exact(group_tokens):
    q, k, v = _qkv(seed=3, temperature=8.0)
    ref = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="exact")
    out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="flash",
                                           group_tokens=group_tokens)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


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


def _poly_error(temperature, degree, approximation="taylor", **kw):
    q, k, v = _qkv(seed=6, temperature=temperature, head_dim=4)
    out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="poly", degree=degree,
                                           approximation=approximation, **kw)
    return np.abs(np.asarray(out, np.float64) - _reference(q, k, v)).max() / np.abs(v).max()


def test_poly_error_follows_theory():
    bound = 2.0
    by_degree = [_poly_error(bound, g) for g in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(by_degree, by_degree[1:])), by_degree
    by_bound = [_poly_error(b, 4) for b in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(by_bound, by_bound[1:])), by_bound
    for g, err in zip((2, 4, 6, 8), by_degree):
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
    assert _poly_error(bound, 6, "chebyshev", logit_bound=bound) <= 2 * eps_cheb / (1 - eps_cheb)


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
        return np.asarray(jax.vmap(one)(keys), np.float64)  # (draws, 2)

    rms = {}
    for orthogonal in (False, True):
        for m in (4, 16, 64):
            est = estimates(m, orthogonal)
            mean, sem = est.mean(0), est.std(0) / math.sqrt(draws)
            assert np.all(np.abs(mean - target) < 4 * sem + 1e-6), (m, orthogonal, mean, target)
            rms[orthogonal, m] = np.sqrt(((est - target) ** 2).mean())
    for m in (4, 16):  # iid features: MSE = var / M exactly, so RMS halves per 4x features
        assert 1.7 < rms[False, m] / rms[False, 4 * m] < 2.3, rms
    for m in (4, 16, 64):  # orthogonal features do not do worse
        assert rms[True, m] < 1.05 * rms[False, m], rms


def test_favor_error_falls_with_features_in_attention():
    q, k, v = _qkv(seed=8, temperature=2.0)
    ref = _reference(q, k, v)
    errs = []
    for m in (16, 256):
        outs = [np.asarray(_call(q, k, v, "favor", seed=s, num_features=m)) for s in range(4)]
        errs.append(np.mean([np.sqrt(((o - ref) ** 2).mean()) for o in outs]))
    assert errs[1] < errs[0] / 2.5, errs


@pytest.mark.parametrize("backend", ALL)
def test_block_causality_by_gradients(backend):
    q, k, v = _qkv(seed=9, temperature=2.0)
    weights = jax.random.normal(jax.random.key(10), q.shape)
    for scale in range(len(PATCH_NUMS)):
        begin, end = LAYOUT.begin_ends[scale]

        def loss(q, k, v, begin=begin, end=end):
            out = _call(q, k, v, backend)
            return jnp.sum(out[:, begin:end] * weights[:, begin:end])

        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        for g in grads:
            g = np.asarray(g)
            assert np.all(g[:, end:] == 0), (backend, scale)
            assert np.all(np.isfinite(g))
        assert np.abs(np.asarray(grads[2])[:, :end]).max() > 0
        if scale > 0:  # a coarser key does influence this scale
            assert np.abs(np.asarray(grads[1])[:, :begin]).max() > 0


@pytest.mark.parametrize("backend", ALL)
def test_incremental_equals_full_and_jit(backend):
    q, k, v = _qkv(seed=11, temperature=3.0)
    opts = LOW_RANK_OPTIONS[backend]
    full = _call(q, k, v, backend)
    full_jit = jax.jit(lambda q, k, v: _call(q, k, v, backend))(q, k, v)
    np.testing.assert_allclose(full_jit, full, atol=2e-6, rtol=1e-5)
    state = attention.init_decode_state(backend, B, H, D, PATCH_NUMS, rng=jax.random.key(1),
                                        **opts)
    step = jax.jit(attention.decode_scale, static_argnames=("scale_index", "backend"))
    outs = []
    for scale, (begin, end) in enumerate(LAYOUT.begin_ends):
        sl = slice(begin, end)
        out, state = step(state, q[:, sl], k[:, sl], v[:, sl], scale_index=scale, backend=backend)
        assert out.shape == q[:, sl].shape
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-6, rtol=1e-5)
    if backend in ("poly", "favor"):  # O(M x D) state, independent of L
        sums = state.arrays["sums"]
        assert sums.s_BxHxMxD.shape[:2] == (B, H) and sums.s_BxHxMxD.shape[-1] == D


def test_low_rank_close_to_exact_at_small_bound():
    q, k, v = _qkv(seed=12, temperature=0.5)
    ref = _reference(q, k, v)
    out = _call(q, k, v, "poly", degree=6)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5
    out = _call(q, k, v, "favor", num_features=1024)
    assert np.abs(np.asarray(out) - ref).max() < 0.05


def test_dtype_is_kept():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(seed=13, temperature=2.0))
    for backend in ALL:
        assert _call(q, k, v, backend).dtype == jnp.bfloat16


def test_auto_follows_plan():
    q, k, v = _qkv(seed=14, temperature=0.25)
    chosen = attention.plan(0.25, D, LAYOUT.seq_len, 1e-3, patch_nums=PATCH_NUMS)
    out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="auto",
                                           logit_bound=0.25, eps=1e-3)
    same = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=chosen.backend,
                                            **chosen.options)
    np.testing.assert_array_equal(out, same)


def test_plan_rule():
    # Small bound, long sequence: the polynomial method is certified and cheaper.
    p = attention.plan(1.0, 16, 39404, 1e-3)
    assert p.backend == "poly" and p.certified and p.cheaper
    assert p.rank == math.comb(16 + p.degree, p.degree) and p.degree % 2 == 0
    assert p.entry_error <= 1e-3 and p.predicted_error == pytest.approx(
        2 * p.entry_error / (1 - p.entry_error))
    # The degree grows with the bound and with the accuracy asked for.
    degrees = [attention.plan(b, 16, 39404, 1e-3).degree for b in (0.5, 1, 2, 4, 8)]
    assert degrees == sorted(degrees) and degrees[0] < degrees[-1]
    assert attention.plan(1.0, 16, 39404, 1e-6).degree > p.degree
    # VAR's temperature (up to 100) with D = 64: exact attention.
    big = attention.plan(100.0, 64, 9676, 1e-3)
    assert big.backend == "flash" and not big.certified
    # Short sequences: certified but not cheaper.
    short = attention.plan(1.0, 64, 30, 1e-2, patch_nums=PATCH_NUMS)
    assert short.certified and not short.cheaper and short.backend == "flash"


def test_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k must"):
        attention.block_causal_attention(q, k[:, :, :1], v, PATCH_NUMS)
    with pytest.raises(ValueError, match="v must"):
        attention.block_causal_attention(q, k, v[:, :-1], PATCH_NUMS)
    with pytest.raises(ValueError, match="q must"):
        attention.block_causal_attention(q[0], k, v, PATCH_NUMS)
    with pytest.raises(ValueError, match="token count 55"):
        attention.block_causal_attention(q, k, v, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="backend"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="linear")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_features"):
            _call(q, k, v, "favor", num_features=bad)
    with pytest.raises(ValueError, match="rng"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="favor")
    with pytest.raises(ValueError, match="degree"):
        _call(q, k, v, "poly", degree=-1)
    with pytest.raises(ValueError, match="not understood"):
        _call(q, k, v, "exact", degree=2)
    with pytest.raises(ValueError, match="logit_bound"):
        attention.plan(0.0, 8, 30, 1e-3)
    with pytest.raises(ValueError, match="eps"):
        attention.plan(1.0, 8, 30, 2.0)
    state = attention.init_decode_state("exact", B, H, D, PATCH_NUMS)
    with pytest.raises(ValueError, match="scale_index"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 4, backend="exact")
    with pytest.raises(ValueError, match="q must have shape"):
        attention.decode_scale(state, q[:, :2], k[:, :2], v[:, :2], 0, backend="exact")
    with pytest.raises(ValueError, match="does not match"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 0, backend="flash")
