"""Exact block-causal softmax attention: the float32 reference the other backends are tested on.

It applies VAR's mask (query i sees key j iff level(j) <= level(i)) to full rows of logits. For long
sequences the logits of all L x L pairs do not fit in memory (L = 39404, H = 8 needs 50 GB), so the
queries are processed in blocks with `lax.map`: memory O(block x L), time still O(L^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales

# Logit elements (block x L x H x B) held at once before the queries are cut into blocks.
_MAX_LOGIT_ELEMENTS = 1 << 25


def _masked_softmax_rows(q_BxCxHxD, qlev_C, k_BxLxHxD, v_BxLxHxD, klev_L):
    logits_BxHxCxL = jnp.einsum("bchd,blhd->bhcl", q_BxCxHxD, k_BxLxHxD,
                                precision=jax.lax.Precision.HIGHEST)
    mask_CxL = klev_L[None, :] <= qlev_C[:, None]
    logits_BxHxCxL = jnp.where(mask_CxL, logits_BxHxCxL, -jnp.inf)
    probs = jax.nn.softmax(logits_BxHxCxL, axis=-1)
    return jnp.einsum("bhcl,blhd->bchd", probs, v_BxLxHxD, precision=jax.lax.Precision.HIGHEST)


def exact_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, patch_nums, *, query_block=None):
    """Masked softmax(q k^T) v in float32; returns q's dtype. ``query_block``: queries per block."""
    layout = scales.token_layout(patch_nums)
    dtype = q_BxLxHxD.dtype
    q, k, v = (x.astype(jnp.float32) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    b, seq_len, h, _ = q.shape
    levels = jnp.asarray(layout.level_ids)
    if query_block is None:
        query_block = max(1, _MAX_LOGIT_ELEMENTS // (seq_len * h * b))
    if query_block >= seq_len:
        return _masked_softmax_rows(q, levels, k, v, levels).astype(dtype)
    num_blocks = -(-seq_len // query_block)
    pad = num_blocks * query_block - seq_len
    # Padded query rows get level 0 so that they see a non-empty set of keys (no NaN); dropped.
    q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    lev_pad = jnp.asarray(np.pad(layout.level_ids, (0, pad)))
    q_blocks = q_pad.reshape(b, num_blocks, query_block, *q.shape[2:]).swapaxes(0, 1)
    lev_blocks = lev_pad.reshape(num_blocks, query_block)

    def one_block(args):
        q_blk, lev_blk = args
        return _masked_softmax_rows(q_blk, lev_blk, k, v, levels)

    out = jax.lax.map(one_block, (q_blocks, lev_blocks))  # (nb, B, C, H, Dv)
    out = out.swapaxes(0, 1).reshape(b, num_blocks * query_block, h, v.shape[-1])
    return out[:, :seq_len].astype(dtype)


def attend_prefix(q_BxlxHxD, k_BxPxHxD, v_BxPxHxD, kv_len=None):
    """One scale's queries against every key of its prefix (no mask needed), float32 softmax.
    ``kv_len`` (a traced int is fine): only the first ``kv_len`` keys are seen (the bucketed
    sampler reads a prefix longer than the scale's own)."""
    dtype = q_BxlxHxD.dtype
    # Heads moved in front once, so both products are plain batched matmuls over (B, H): on a
    # CPU about 1.2x faster than letting the einsums transpose around each dot.
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2)
               for x in (q_BxlxHxD, k_BxPxHxD, v_BxPxHxD))
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision=jax.lax.Precision.HIGHEST)
    if kv_len is not None:
        logits = jnp.where(jnp.arange(k.shape[-2]) < kv_len, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.matmul(probs, v, precision=jax.lax.Precision.HIGHEST)
    return jnp.swapaxes(out, 1, 2).astype(dtype)
