"""Block-causal attention as per-scale *unmasked* fused attention calls.

Queries of scale k attend to every key of scales <= k, so no mask is needed inside a scale's call,
and fused kernels (cuDNN flash attention on GPU) apply; a single masked call cannot use them (the
official code passes a mask, so it never uses flash kernels in training). Two measured facts shape
the grouping: many tiny calls cost more than one, and the cuDNN backward refuses sequence length 1.
So the scales whose prefix holds at most ``group_tokens`` tokens (always including the 1x1 start
scale) go through one masked XLA call; each larger scale gets its own fused call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax import scales

DEFAULT_GROUP_TOKENS = 256


def default_implementation(dtype):
    """cuDNN for half precision on GPU (it supports nothing else); otherwise let JAX choose."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def flash_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, patch_nums, *, implementation="default",
                    group_tokens=DEFAULT_GROUP_TOKENS):
    """Same function as `exact_attention`, computed scale by scale with fused kernels."""
    layout = scales.token_layout(patch_nums)
    if implementation == "default":
        implementation = default_implementation(q_BxLxHxD.dtype)
    q, k, v = q_BxLxHxD, k_BxLxHxD, v_BxLxHxD
    g_end = scales.leading_group_end(layout.begin_ends, group_tokens, include_first=True)
    outs = []
    levels = jnp.asarray(layout.level_ids[:g_end])
    mask = (levels[None, :] <= levels[:, None])[None, None]
    outs.append(jax.nn.dot_product_attention(q[:, :g_end], k[:, :g_end], v[:, :g_end],
                                             mask=mask, scale=1.0, implementation="xla"))
    for begin, end in layout.begin_ends:
        if end <= g_end:
            continue
        outs.append(prefix_call(q[:, begin:end], k[:, :end], v[:, :end], implementation))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def prefix_call(q_BxlxHxD, k_BxPxHxD, v_BxPxHxD, implementation="default", kv_len=None):
    """One scale's queries against its whole prefix through `jax.nn.dot_product_attention`;
    with ``kv_len`` (a traced int is fine) against its first ``kv_len`` keys only."""
    if implementation == "default":
        implementation = default_implementation(q_BxlxHxD.dtype)
    if q_BxlxHxD.shape[1] == 1 or k_BxPxHxD.shape[1] == 1:
        implementation = "xla"  # cuDNN refuses length-1 sequences.
    lengths = (None if kv_len is None
               else jnp.full((q_BxlxHxD.shape[0],), kv_len, jnp.int32))
    return jax.nn.dot_product_attention(q_BxlxHxD, k_BxPxHxD, v_BxPxHxD, scale=1.0,
                                        key_value_seq_lengths=lengths,
                                        implementation=implementation)
