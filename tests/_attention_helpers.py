"""Shared inputs and the float64 reference of the attention tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import attention, scales

PATCH_NUMS = (1, 2, 3, 4)
LAYOUT = scales.token_layout(PATCH_NUMS)
B, H, D = 2, 2, 8
OPTIONS = {"exact": {}, "flash": {}, "poly": {"degree": 4}, "favor": {"num_features": 64}}
ALL = tuple(OPTIONS)


def qkv(seed=0, temperature=None, head_dim=D, batch=B, heads=H):
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, LAYOUT.seq_len, heads, head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    if temperature is not None:  # VAR's attn_l2_norm: |q . k| <= temperature
        q = temperature * q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return q, k, v


def reference(q, k, v, patch_nums=PATCH_NUMS):
    """Block-causal softmax attention in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(scales.block_causal_mask(patch_nums), logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@functools.cache
def jitted(backend, **options):
    """One compiled block_causal_attention(q, k, v, rng) per backend and options."""
    opts = dict(OPTIONS[backend], **options)

    def run(q, k, v, rng):
        return attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend, rng=rng,
                                                **opts)
    return jax.jit(run)


def call(q, k, v, backend, seed=1, **options):
    return jitted(backend, **options)(q, k, v, jax.random.key(seed))
