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

Internally arrays are head-major (B, H, tokens, .): the contractions over tokens and features are
then plain batched matrix products, with no transposes of the large feature tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales

# Feature elements (B x H x chunk x M) materialised at once: 32 MB on CPU (cache-sized, leaves
# the host's memory alone), 1 GB on accelerators (fewer, larger kernels).
_CHUNK_ELEMENTS = {"cpu": 1 << 23}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 28
_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_GROUP_TOKENS = 256
NO_SCALE = -1e30  # initial log-scale: exp(NO_SCALE - c) underflows to 0 for any real c


class FeatureMap(NamedTuple):
    """query(x_...xD) -> ...xM features; key(x_...xD) -> ...xM features, or their logs when
    ``log_domain`` (the core then subtracts the running stabiliser c before exponentiating)."""

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
    budget = _CHUNK_ELEMENTS.get(jax.default_backend(), _CHUNK_ELEMENTS_ACCELERATOR)
    return max(16, budget // max(1, batch * num_heads * num_features))


def precision_for(dtype):
    """Full float32 sums for float32 inputs; the platform's fast default (TF32 on recent GPUs)
    for half-precision inputs, whose own rounding is coarser."""
    if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return jax.lax.Precision.DEFAULT
    return _HIGHEST


def _heads_first(x_BxlxHxD):
    return jnp.swapaxes(x_BxlxHxD.astype(jnp.float32), 1, 2)


def _split_chunks(x_BxHxlxD, chunk):
    """(full chunks stacked on axis 0 or None, remainder or None), static shapes."""
    b, h, length = x_BxHxlxD.shape[:3]
    num_full = length // chunk
    if num_full <= 1:
        return None, x_BxHxlxD
    full = x_BxHxlxD[:, :, :num_full * chunk].reshape(b, h, num_full, chunk, -1)
    rest = x_BxHxlxD[:, :, num_full * chunk:] if num_full * chunk < length else None
    return jnp.moveaxis(full, 2, 0), rest


def _absorb_raw(fmap, sums, raw_BxHxCxM, v_BxHxCxD):
    if fmap.log_domain:
        c_new = jnp.maximum(sums.c_BxH, jax.lax.stop_gradient(raw_BxHxCxM.max(axis=(2, 3))))
        feats = jnp.exp(raw_BxHxCxM - c_new[:, :, None, None])
        rescale = jnp.exp(sums.c_BxH - c_new)
        s = sums.s_BxHxMxD * rescale[..., None, None]
        z = sums.z_BxHxM * rescale[..., None]
    else:
        feats, c_new, s, z = raw_BxHxCxM, sums.c_BxH, sums.s_BxHxMxD, sums.z_BxHxM
    s = s + jnp.einsum("bhcm,bhcd->bhmd", feats, v_BxHxCxD, precision=fmap.precision)
    z = z + feats.sum(axis=2)
    return Sums(s, z, c_new)


def _absorb_chunk(fmap, sums, k_BxHxCxD, v_BxHxCxD):
    return _absorb_raw(fmap, sums, fmap.key(k_BxHxCxD), v_BxHxCxD)


def _absorb(fmap, sums, k_BxHxlxD, v_BxHxlxD, chunk):
    k_full, k_rest = _split_chunks(k_BxHxlxD, chunk)
    v_full, v_rest = _split_chunks(v_BxHxlxD, chunk)
    if k_full is not None:
        body = jax.checkpoint(lambda s, kv: (_absorb_chunk(fmap, s, *kv), None))
        sums, _ = jax.lax.scan(body, sums, (k_full, v_full))
    if k_rest is not None:
        sums = _absorb_chunk(fmap, sums, k_rest, v_rest)
    return sums


def absorb(fmap: FeatureMap, sums: Sums, k_BxlxHxD, v_BxlxHxD, chunk: int) -> Sums:
    """Adds one scale's keys and values to the running sums."""
    return _absorb(fmap, sums, _heads_first(k_BxlxHxD), _heads_first(v_BxlxHxD), chunk)


def _read_feats(fmap, sums, feats_BxHxCxM):
    num = jnp.einsum("bhcm,bhmd->bhcd", feats_BxHxCxM, sums.s_BxHxMxD, precision=fmap.precision)
    den = jnp.einsum("bhcm,bhm->bhc", feats_BxHxCxM, sums.z_BxHxM, precision=fmap.precision)
    den = jnp.where(den == 0, 1.0, den)  # all features underflowed: output 0, not NaN
    return num / den[..., None]


def _read(fmap, sums, q_BxHxlxD, chunk):
    q_full, q_rest = _split_chunks(q_BxHxlxD, chunk)
    outs = []
    if q_full is not None:
        body = jax.checkpoint(lambda qc: _read_feats(fmap, sums, fmap.query(qc)))
        out = jnp.moveaxis(jax.lax.map(body, q_full), 0, 2)  # (B, H, n, C, D)
        outs.append(out.reshape(*out.shape[:2], -1, out.shape[-1]))
    if q_rest is not None:
        outs.append(_read_feats(fmap, sums, fmap.query(q_rest)))
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


def read(fmap: FeatureMap, sums: Sums, q_BxlxHxD, chunk: int):
    """Attention output (B, l, H, D) float32 of one scale's queries against the running sums."""
    return jnp.swapaxes(_read(fmap, sums, _heads_first(q_BxlxHxD), chunk), 1, 2)


def _grouped_prefix(fmap, q_feats, raw_k, v, begin_ends, group_end):
    """The first scales (``group_end`` tokens) as one masked quadratic product of the features.

    One small (G x G) product replaces a handful of tiny per-scale steps (kernel launches on an
    accelerator). The key stabiliser is the max over the group (a constant per (batch, head),
    under stop_gradient, so it cancels and passes no gradient). Head-major arrays; returns the
    outputs and the running sums at the end of the group.
    """
    levels = np.concatenate([np.full(e - b, i) for i, (b, e) in enumerate(begin_ends)
                             if e <= group_end])
    mask_GxG = jnp.asarray(levels[None, :] <= levels[:, None])
    c = jnp.full(raw_k.shape[:2], NO_SCALE, jnp.float32)
    if fmap.log_domain:
        c = jax.lax.stop_gradient(raw_k.max(axis=(2, 3)))
        k_feats = jnp.exp(raw_k - c[:, :, None, None])
    else:
        k_feats = raw_k
    a = jnp.einsum("bhqm,bhkm->bhqk", q_feats, k_feats, precision=fmap.precision)
    a = jnp.where(mask_GxG, a, 0.0)
    num = jnp.einsum("bhqk,bhkd->bhqd", a, v, precision=fmap.precision)
    den = a.sum(axis=-1)
    den = jnp.where(den == 0, 1.0, den)
    sums = Sums(jnp.einsum("bhkm,bhkd->bhmd", k_feats, v, precision=fmap.precision),
                k_feats.sum(axis=2), c)
    return num / den[..., None], sums


def full_attention(fmap: FeatureMap, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, begin_ends, chunk: int,
                   group_tokens: int = DEFAULT_GROUP_TOKENS):
    """Every scale in turn from empty sums; float32 (B, L, H, D).

    When all features fit in one chunk budget (B H L M <= B H chunk M), they are computed once
    for the whole sequence (a small graph, few kernels) and the scales ending within the first
    ``group_tokens`` tokens are done in one masked product; otherwise scale by scale in chunks,
    exactly as the decoder does.
    """
    q, k, v = (_heads_first(x) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    batch, heads = q.shape[:2]
    sums = init_sums(batch, heads, fmap.num_features, v.shape[-1])
    outs = []
    if q.shape[2] <= chunk:
        feats_q, raw_k = fmap.query(q), fmap.key(k)
        group_end = scales.leading_group_end(begin_ends, group_tokens)
        if group_end:
            out, sums = _grouped_prefix(fmap, feats_q[:, :, :group_end], raw_k[:, :, :group_end],
                                        v[:, :, :group_end], begin_ends, group_end)
            outs.append(out)
        for begin, end in begin_ends:
            if end <= group_end:
                continue
            sums = _absorb_raw(fmap, sums, raw_k[:, :, begin:end], v[:, :, begin:end])
            outs.append(_read_feats(fmap, sums, feats_q[:, :, begin:end]))
    else:
        for begin, end in begin_ends:
            sums = _absorb(fmap, sums, k[:, :, begin:end], v[:, :, begin:end], chunk)
            outs.append(_read(fmap, sums, q[:, :, begin:end], chunk))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return jnp.swapaxes(out, 1, 2)
