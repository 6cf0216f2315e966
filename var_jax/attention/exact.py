"""Exact block-causal softmax attention: the float32 reference the other backends are tested on.

Query i sees key j iff level(j) <= level(i), so the queries of scale k see exactly the keys of
scales 0..k: each scale past the first few is computed as an unmasked product against its own
prefix, and only the leading scales within ``group_tokens`` tokens share one masked product.
That multiplies only the (query, key) pairs the mask allows (67% of the pairs at the demo's
schedule, 62% at 256 px) instead of all L x L. Measured on a 2-core CPU (AMD EPYC, Zen 3,
2026-12-07; docs/train_benchmark.md): the demo's attention forward and backward (B 32, L 130,
two heads of 64) in 12.5 ms against 21.0 for the one masked product of before, and the demo's
whole VAR step in 0.91x its time.

For long sequences the logits of one product may not fit in memory (L = 39404, H = 8 needs 50
GB), so its queries are processed in blocks with `lax.map`: memory O(block x L), time still
O(L^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales

# Logit elements (block x L x H x B) held at once before the queries are cut into blocks.
_MAX_LOGIT_ELEMENTS = 1 << 25
# Leading scales within this many tokens share one masked product (a few tiny products cost more
# than one small masked one); the demo's schedule: 1x1 ... 4x4 (30 tokens) together, 6x6 and 8x8
# each alone.
DEFAULT_GROUP_TOKENS = 64
_HIGHEST = jax.lax.Precision.HIGHEST


def _softmax_rows(q_BxHxCxD, k_BxHxPxD, v_BxHxPxD, bias_CxP=None):
    """softmax(q k^T + bias) v over heads-first arrays: both products are plain batched matmuls
    over (B, H) (on a CPU about 1.2x faster than einsums that transpose around each dot). The
    mask enters as an additive bias of 0 / -inf, which XLA:CPU fuses into the softmax more
    cheaply than a select."""
    logits = jnp.matmul(q_BxHxCxD, jnp.swapaxes(k_BxHxPxD, -1, -2), precision=_HIGHEST)
    if bias_CxP is not None:
        logits = logits + bias_CxP
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.matmul(probs, v_BxHxPxD, precision=_HIGHEST)


def _mask_bias(qlev_C, klev_P):
    return jnp.where(klev_P[None, :] <= qlev_C[:, None], 0.0, -jnp.inf).astype(jnp.float32)


def _rows(q_BxHxCxD, k_BxHxPxD, v_BxHxPxD, qlev_C, klev_P, query_block):
    """Queries (with their levels, or None: every key visible) against keys ``k``, in blocks of
    ``query_block`` queries when the logits would be too large."""
    b, h, c, _ = q_BxHxCxD.shape
    p = k_BxHxPxD.shape[2]
    if query_block is None:
        query_block = max(1, _MAX_LOGIT_ELEMENTS // (p * h * b))
    if query_block >= c:
        bias = None if qlev_C is None else _mask_bias(jnp.asarray(qlev_C), jnp.asarray(klev_P))
        return _softmax_rows(q_BxHxCxD, k_BxHxPxD, v_BxHxPxD, bias)
    num_blocks = -(-c // query_block)
    pad = num_blocks * query_block - c
    # Padded query rows get level 0 so that they see a non-empty set of keys (no NaN); dropped.
    q_pad = jnp.pad(q_BxHxCxD, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_blocks = jnp.moveaxis(q_pad.reshape(b, h, num_blocks, query_block, -1), 2, 0)
    if qlev_C is None:
        out = jax.lax.map(lambda q_blk: _softmax_rows(q_blk, k_BxHxPxD, v_BxHxPxD), q_blocks)
    else:
        lev_blocks = jnp.asarray(np.pad(qlev_C, (0, pad)).reshape(num_blocks, query_block))
        klev = jnp.asarray(klev_P)
        out = jax.lax.map(
            lambda args: _softmax_rows(args[0], k_BxHxPxD, v_BxHxPxD, _mask_bias(args[1], klev)),
            (q_blocks, lev_blocks))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, num_blocks * query_block, -1)
    return out[:, :, :c]


def exact_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, patch_nums, *, query_block=None,
                    group_tokens=DEFAULT_GROUP_TOKENS):
    """Masked softmax(q k^T) v in float32; returns q's dtype. ``query_block``: queries per block
    of one product (None: by a logit-memory budget); ``group_tokens``: the leading scales within
    this many tokens are one masked product, every later scale its own unmasked one (at least
    the sequence's length: one masked product over everything)."""
    layout = scales.token_layout(patch_nums)
    dtype = q_BxLxHxD.dtype
    # Heads moved in front once for every product below.
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2)
               for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    levels = layout.level_ids
    g_end = scales.leading_group_end(layout.begin_ends, group_tokens, include_first=True)
    outs = [_rows(q[:, :, :g_end], k[:, :, :g_end], v[:, :, :g_end], levels[:g_end],
                  levels[:g_end], query_block)]
    for begin, end in layout.begin_ends:
        if end > g_end:
            outs.append(_rows(q[:, :, begin:end], k[:, :, :end], v[:, :, :end], None, None,
                              query_block))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return jnp.swapaxes(out, 1, 2).astype(dtype)


def attend_prefix(q_BxlxHxD, k_BxPxHxD, v_BxPxHxD, kv_len=None):
    """One scale's queries against every key of its prefix (no mask needed), float32 softmax.
    ``kv_len`` (a traced int is fine): only the first ``kv_len`` keys are seen (the bucketed
    sampler reads a prefix longer than the scale's own)."""
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2)
               for x in (q_BxlxHxD, k_BxPxHxD, v_BxPxHxD))
    bias = None
    if kv_len is not None:
        bias = jnp.where(jnp.arange(k.shape[-2]) < kv_len, 0.0, -jnp.inf).astype(jnp.float32)
    out = _softmax_rows(q, k, v, bias)
    return jnp.swapaxes(out, 1, 2).astype(q_BxlxHxD.dtype)
