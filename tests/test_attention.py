"""Exact and fused block-causal attention, the plan criterion and input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_helpers import ALL, LAYOUT, PATCH_NUMS, B, D, H, call, qkv, reference

from var_jax import attention


@pytest.mark.parametrize("query_block", [None, 7])
@pytest.mark.parametrize("group_tokens", [0, 5, 14, None])
def test_exact_matches_float64_reference(query_block, group_tokens):
    """Every split of the scales into one masked product and per-scale unmasked ones (None:
    the default, here one masked product over all 30 tokens), with and without query blocks."""
    q, k, v = qkv(temperature=5.0)
    ref = reference(q, k, v)
    options = {} if group_tokens is None else {"group_tokens": group_tokens}
    out = call(q, k, v, "exact", query_block=query_block, **options)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    rel = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert rel < 1e-5


def test_exact_split_by_scale_has_the_gradients_of_one_masked_product():
    q, k, v = qkv(seed=5, temperature=6.0)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def grads(group_tokens):
        def loss(q, k, v):
            out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="exact",
                                                   group_tokens=group_tokens)
            return jnp.sum(out * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for split, whole in zip(grads(0), grads(LAYOUT.seq_len), strict=True):
        np.testing.assert_allclose(split, whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group_tokens", [1, 14, 256])
def test_flash_equals_exact(group_tokens):
    q, k, v = qkv(seed=3, temperature=8.0)
    ref = call(q, k, v, "exact")
    out = call(q, k, v, "flash", group_tokens=group_tokens)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_dtype_is_kept():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(seed=13, temperature=2.0))
    for backend in ALL:
        out = call(q, k, v, backend)
        assert out.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_auto_follows_plan():
    q, k, v = qkv(seed=14, temperature=0.25)
    chosen = attention.plan(0.25, D, LAYOUT.seq_len, 1e-3, patch_nums=PATCH_NUMS)
    out = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="auto",
                                           logit_bound=0.25, eps=1e-3)
    same = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=chosen.backend,
                                            **chosen.options)
    np.testing.assert_array_equal(out, same)


def test_plan_rule():
    # Small bound, long sequence, small head dim: certified and cheaper.
    p = attention.plan(1.0, 8, 39404, 1e-3)
    assert p.backend == "poly" and p.certified and p.cheaper, p
    assert p.rank == math.comb(8 + p.degree, p.degree) and p.degree % 2 == 0
    assert p.entry_error <= 1e-3 and p.predicted_error == pytest.approx(
        2 * p.entry_error / (1 - p.entry_error))
    assert p.options == {"degree": p.degree, "approximation": "taylor", "center": p.center}
    # The degree grows with the bound and with the accuracy asked for.
    degrees = [attention.plan(b, 16, 39404, 1e-3).degree for b in (0.5, 1, 2, 4, 8)]
    assert degrees == sorted(degrees) and degrees[0] < degrees[-1]
    assert attention.plan(1.0, 8, 39404, 1e-6).degree > p.degree
    # At head dim 64 the same accuracy costs a rank beyond any exact cost at this length.
    wide = attention.plan(1.0, 64, 39404, 1e-3)
    assert wide.certified and not wide.cheaper and wide.backend == "flash"
    # VAR's temperature (up to 100): no certified degree within reach.
    big = attention.plan(100.0, 64, 9676, 1e-3)
    assert big.backend == "flash" and not big.certified
    # Short sequences: certified but not cheaper.
    short = attention.plan(1.0, 64, 30, 1e-2, patch_nums=PATCH_NUMS)
    assert short.certified and not short.cheaper and short.backend == "flash"
    assert short.exact_cost == 2 * 64 * attention.criterion.block_causal_pairs(PATCH_NUMS)


def test_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must"):
        attention.block_causal_attention(q, k[:, :, :1], v, PATCH_NUMS)
    with pytest.raises(ValueError, match="v must"):
        attention.block_causal_attention(q, k, v[:, :-1], PATCH_NUMS)
    with pytest.raises(ValueError, match="q must"):
        attention.block_causal_attention(q[0], k, v, PATCH_NUMS)
    with pytest.raises(ValueError, match="token count 55"):
        attention.block_causal_attention(q, k, v, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="patch_nums"):
        attention.block_causal_attention(q, k, v, (1, 3, 2, 4))
    with pytest.raises(ValueError, match="backend"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="linear")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_features"):
            attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="favor",
                                             rng=jax.random.key(0), num_features=bad)
        with pytest.raises(ValueError, match="num_features"):
            attention.init_decode_state("favor", B, H, D, PATCH_NUMS, rng=jax.random.key(0),
                                        num_features=bad)
    with pytest.raises(ValueError, match="rng"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="favor")
    with pytest.raises(ValueError, match="degree"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="poly", degree=-1)
    with pytest.raises(ValueError, match="logit_bound"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="poly",
                                         approximation="chebyshev")
    with pytest.raises(ValueError, match="not understood"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="exact", degree=2)
    with pytest.raises(ValueError, match="logit_bound"):
        attention.block_causal_attention(q, k, v, PATCH_NUMS, backend="auto")
    with pytest.raises(ValueError, match="logit_bound"):
        attention.plan(0.0, 8, 30, 1e-3)
    with pytest.raises(ValueError, match="eps"):
        attention.plan(1.0, 8, 30, 2.0)
    with pytest.raises(ValueError, match="seq_len"):
        attention.plan(1.0, 8, 31, 1e-3, patch_nums=PATCH_NUMS)
    state = attention.init_decode_state("exact", B, H, D, PATCH_NUMS)
    with pytest.raises(ValueError, match="scale_index"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 4, backend="exact")
    with pytest.raises(ValueError, match="q must have shape"):
        attention.decode_scale(state, q[:, :2], k[:, :2], v[:, :2], 0, backend="exact")
    with pytest.raises(ValueError, match="does not match"):
        attention.decode_scale(state, q[:, :1], k[:, :1], v[:, :1], 0, backend="flash")
    with pytest.raises(ValueError, match="head_dim"):
        attention.init_decode_state("poly", B, H, 0, PATCH_NUMS)
