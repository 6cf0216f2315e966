"""The block-causal prefix-sum core shared by the low-rank backends (poly, favor).

With a factorisation exp(q . k) ~ phi_q(q) . phi_k(k) of rank M, block-causal attention needs, for
the queries of scale k, only the sums over every key of scales <= k:

    S_k = sum_j phi_k(k_j) v_j^T   (M x D),    z_k = sum_j phi_k(k_j)   (M),
    out_i = phi_q(q_i) S_k / phi_q(q_i) z_k.

There is no intra-scale triangle (a token sees all of its own scale), so a Python loop over the K
scales (K = O(log n), unrolled under jit) keeps running sums; they are also exactly the decoding
state, so the full call *is* the scale-by-scale decoder run in one go. Memory: the features of at
most one chunk of tokens exist at a time (``chunk`` tokens, scanned with rematerialisation), so
peak memory is O(L x D + M x D) per head and does not grow with L beyond the inputs and outputs.

Key features may carry a per-(batch, head) log-scale ``c`` (FAVOR+ stabiliser): features are
exp(.. - c) and sums already accumulated are rescaled by exp(c_old - c_new) when c grows, the
online-softmax trick. Any constant factor on the key side cancels in out_i, and the full call and
the decoder see the same sequence of chunks, so they agree to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Feature elements (B x chunk x H x M) materialised at once.
_CHUNK_ELEMENTS = 1 << 23
_HIGHEST = jax.lax.Precision.HIGHEST
NO_SCALE = -1e30  # initial log-scale: exp(NO_SCALE - c) underflows to 0 for any real c


class FeatureMap(NamedTuple):
    """query(x_BxCxHxD) -> BxCxHxM features; key(x_BxCxHxD) -> BxCxHxM features, or their logs
    when ``log_domain`` (then the core applies the running stabiliser c before exponentiating)."""

    num_features: int
    query: Callable
    key: Callable
    log_domain: bool = False
    precision: jax.lax.Precision = _HIGHEST


class Sums(NamedTuple):
    s_BxHxMxD: jax.Array
    z_BxHxM: jax.Array
    c_BxH: jax.Array


def init_sums(batch, num_heads, num_features, head_dim) -> Sums:
    return Sums(jnp.zeros((batch, num_heads, num_features, head_dim), jnp.float32),
                jnp.zeros((batch, num_heads, num_features), jnp.float32),
                jnp.full((batch, num_heads), NO_SCALE, jnp.float32))


def default_chunk(batch, num_heads, num_features):
    return max(16, _CHUNK_ELEMENTS // max(1, batch * num_heads * num_features))


def _split_chunks(x_BxlxHxD, chunk):
    """(full chunks stacked on axis 0 or None, remainder or None), static shapes."""
    b, length = x_BxlxHxD.shape[:2]
    num_full = length // chunk
    if num_full <= 1:
        return None, x_BxlxHxD
    full = x_BxlxHxD[:, :num_full * chunk].reshape(b, num_full, chunk, *x_BxlxHxD.shape[2:])
    rest = x_BxlxHxD[:, num_full * chunk:] if num_full * chunk < length else None
    return jnp.moveaxis(full, 1, 0), rest


def _absorb_raw(fmap, sums, raw_BxCxHxM, v_BxCxHxD):
    if fmap.log_domain:
        c_new = jnp.maximum(sums.c_BxH, jax.lax.stop_gradient(raw_BxCxHxM.max(axis=(1, 3))))
        feats = jnp.exp(raw_BxCxHxM - c_new[:, None, :, None])
        rescale = jnp.exp(sums.c_BxH - c_new)
        s = sums.s_BxHxMxD * rescale[..., None, None]
        z = sums.z_BxHxM * rescale[..., None]
    else:
        feats, c_new, s, z = raw_BxCxHxM, sums.c_BxH, sums.s_BxHxMxD, sums.z_BxHxM
    s = s + jnp.einsum("bchm,bchd->bhmd", feats, v_BxCxHxD, precision=fmap.precision)
    z = z + feats.sum(axis=1)
    return Sums(s, z, c_new)


def _absorb_chunk(fmap, sums, k_BxCxHxD, v_BxCxHxD):
    return _absorb_raw(fmap, sums, fmap.key(k_BxCxHxD), v_BxCxHxD)


def absorb(fmap: FeatureMap, sums: Sums, k_BxlxHxD, v_BxlxHxD, chunk: int) -> Sums:
    """Adds one scale's keys and values to the running sums."""
    k, v = k_BxlxHxD.astype(jnp.float32), v_BxlxHxD.astype(jnp.float32)
    k_full, k_rest = _split_chunks(k, chunk)
    v_full, v_rest = _split_chunks(v, chunk)
    if k_full is not None:
        body = jax.checkpoint(lambda s, kv: (_absorb_chunk(fmap, s, *kv), None))
        sums, _ = jax.lax.scan(body, sums, (k_full, v_full))
    if k_rest is not None:
        sums = _absorb_chunk(fmap, sums, k_rest, v_rest)
    return sums


def _read_feats(fmap, sums, feats_BxCxHxM):
    num = jnp.einsum("bchm,bhmd->bchd", feats_BxCxHxM, sums.s_BxHxMxD, precision=fmap.precision)
    den = jnp.einsum("bchm,bhm->bch", feats_BxCxHxM, sums.z_BxHxM, precision=fmap.precision)
    den = jnp.where(den == 0, 1.0, den)  # all features underflowed: output 0, not NaN
    return num / den[..., None]


def read(fmap: FeatureMap, sums: Sums, q_BxlxHxD, chunk: int):
    """Attention output (float32) of one scale's queries against the sums of its prefix."""
    q = q_BxlxHxD.astype(jnp.float32)
    q_full, q_rest = _split_chunks(q, chunk)
    outs = []
    if q_full is not None:
        body = jax.checkpoint(lambda qc: _read_feats(fmap, sums, fmap.query(qc)))
        out = jax.lax.map(body, q_full)  # (n, B, C, H, D)
        out = jnp.moveaxis(out, 0, 1)
        outs.append(out.reshape(out.shape[0], -1, *out.shape[3:]))
    if q_rest is not None:
        outs.append(_read_feats(fmap, sums, fmap.query(q_rest)))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def full_attention(fmap: FeatureMap, sums: Sums, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, begin_ends,
                   chunk: int):
    """Every scale in turn from ``sums`` (normally empty); float32 (B, L, H, D).

    When all features fit in one chunk budget (B L H M <= chunk B H M), they are computed once
    for the whole sequence (a small graph, few kernels); otherwise scale by scale in chunks,
    exactly as the decoder does.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    outs = []
    if q.shape[1] <= chunk:
        feats_q, raw_k = fmap.query(q), fmap.key(k)
        for begin, end in begin_ends:
            sums = _absorb_raw(fmap, sums, raw_k[:, begin:end], v[:, begin:end])
            outs.append(_read_feats(fmap, sums, feats_q[:, begin:end]))
    else:
        for begin, end in begin_ends:
            sums = absorb(fmap, sums, k[:, begin:end], v[:, begin:end], chunk)
            outs.append(read(fmap, sums, q[:, begin:end], chunk))
    return jnp.concatenate(outs, axis=1)
