"""Next-scale sampling of a batch as one jit-compiled function, then the VQ-VAE decoder.

Why one function: the official sampler is a Python loop of depth x K block calls with a growing
KV cache; per-call overhead dominates at small batch. Here the K scales are unrolled inside one
`jax.jit` (each scale has static shapes), every block carries an attention decode state made by
`attention.init_decode_state` (a preallocated KV cache for exact/flash, O(features x head_dim)
running sums for poly/favor) that lives inside the compiled program, and the conditional and
unconditional halves of classifier-free guidance run as one doubled batch. With
``Sampler(scale_buckets=True)`` the scales run instead in buckets (``scales.sampling_buckets``),
each one ``lax.scan`` over a step at the bucket's largest map with the scale's offsets traced:
fewer shapes to compile, padded rows to run (docs/scan_layers.md). The decoder that turns the
final f_hat into images is a second compiled function (:func:`decode_images`), so that it can
be compiled with its own XLA options.

Per scale k (ratio = k / (K - 1)), as the official ``autoregressive_infer_cfg``:
logits = (1 + t) cond - t uncond with t = cfg * ratio ** guidance_power (1, the default, is the
official linear ramp; 2 puts the guidance on the finest scales, 0 the same guidance everywhere);
top-k (ties with the k-th value kept), then top-p on what is left (the largest always kept); a
multinomial draw per token; with ``more_smooth`` the map fed on is a Gumbel-softmax mixture of
codes (tau = max(0.27 (1 - 0.95 ratio), 0.005), logits x (1 + ratio); each token's noise drawn
from the key and its position); then f_hat +=
Phi_k(up(h)) and the next scale's input is the area-downsampled f_hat. ``top_k=0`` and
``top_p=0`` switch those filters off.

Zero-shot editing (the official notebook): given reference token maps and a keep-mask, tokens
inside the mask (bilinearly resized to each scale, > 0.5; always at scales with pn**2 <= 3) are
replaced by the reference's, so the model in-paints / out-paints the rest, with any class.
The sampled tokens are the same function of the key whatever the backend, the device aside.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import attention, checks, interp, scales, xla_options
from var_jax.models.var import LayerKernels

# ----------------------------------------------------------------------------------------------
# Pure pieces.


def cfg_mix(logits_2BxlxV, t):
    """Classifier-free guidance: (1 + t) cond - t uncond; the first half of the batch is cond."""
    half = logits_2BxlxV.shape[0] // 2
    return (1 + t) * logits_2BxlxV[:half] - t * logits_2BxlxV[half:]


def _ordered_bits(x):
    """float32 -> uint32 with the same order (sign-magnitude bits made monotone)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = bits >> 31 == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))


def _kth_largest_bits(bits_xV, k: int):
    """Per row, the ordered bits of the k-th largest value (ties counted): the largest t with
    #{bits >= t} >= k. 32 counting passes instead of a sort: XLA's CPU sort and top-k cost
    several times more on (tokens x 4096) logits."""
    lo = jnp.min(bits_xV, axis=-1, keepdims=True)
    hi = jnp.max(bits_xV, axis=-1, keepdims=True)

    def step(_, lo_hi):
        lo, hi = lo_hi
        diff = hi - lo
        mid = lo + diff - diff // 2  # ceil midpoint, no overflow
        ok = jnp.sum(bits_xV >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - jnp.uint32(1))

    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


def _top_p_cutoff_bits(bits_xV, probs_xV, lo, top_p):
    """Per row, the smallest kept t whose ascending mass #{p : bits <= t} exceeds 1 - top_p
    (the official rule: sorted ascending, tokens whose cumulative probability is <= 1 - top_p
    are removed); at most the row's largest value, so the largest token always survives."""
    hi = jnp.max(bits_xV, axis=-1, keepdims=True)
    threshold = 1.0 - top_p

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits_xV <= mid, probs_xV, 0.0), axis=-1, keepdims=True)
        ok = (mass > threshold) | (mid >= hi)
        return jnp.where(ok, lo, mid + jnp.uint32(1)), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, step, (lo, hi))[1]


def filter_top_k_top_p(logits_xV, top_k: int, top_p=None):
    """Sets filtered logits to -inf: top-k first (ties with the k-th kept), then top-p.

    ``top_k`` is a static int (0 or >= V: off); ``top_p`` None means off, else a scalar (traced
    is fine) in (0, 1]: sorted ascending, the tokens whose cumulative probability is
    <= 1 - top_p are removed, the largest always kept (the official rule). Both cuts are found
    as value thresholds by bisection on the float bits (exact, ties kept together), which on
    a CPU is several times faster than ``lax.top_k`` or a sort of the vocabulary.
    """
    vocab = logits_xV.shape[-1]
    if top_k < 0 or top_k > vocab:
        raise ValueError(f"top_k must be in [0, {vocab}] (the vocabulary size), got {top_k}")
    use_k = 0 < top_k < vocab
    if not use_k and top_p is None:
        return logits_xV
    bits = _ordered_bits(logits_xV)
    if use_k:
        cut = _kth_largest_bits(bits, top_k)
    else:
        cut = jnp.min(bits, axis=-1, keepdims=True)
    filtered = jnp.where(bits < cut, -jnp.inf, logits_xV)
    if top_p is None:
        return filtered
    probs = jax.nn.softmax(filtered.astype(jnp.float32), axis=-1)
    cut = _top_p_cutoff_bits(bits, probs, cut, jnp.asarray(top_p, jnp.float32))
    return jnp.where(bits < cut, -jnp.inf, filtered)


def _cdf_blocked(probs_xV):
    """Inclusive cumulative sums over the last axis as two small triangular matmuls (within
    blocks of 64, then the block offsets) instead of ``jnp.cumsum``: the same sums to float32
    rounding, 2-3x faster on a CPU, and a few dot fusions to compile instead of the
    reduce-window tree XLA builds for a cumsum at every scale's shape."""
    vocab = probs_xV.shape[-1]
    block = next(b for b in (64, 32, 16, 8, 4, 2, 1) if vocab % b == 0)
    blocks = probs_xV.reshape(probs_xV.shape[:-1] + (vocab // block, block))
    inclusive = jnp.triu(jnp.ones((block, block), probs_xV.dtype))
    within = jnp.einsum("...kb,bc->...kc", blocks, inclusive, precision="highest")
    exclusive = jnp.triu(jnp.ones((vocab // block,) * 2, probs_xV.dtype), 1)
    offsets = jnp.einsum("...k,kj->...j", within[..., -1], exclusive, precision="highest")
    return (within + offsets[..., None]).reshape(probs_xV.shape)


def categorical_from_uniform(u_x, logits_xV):
    """One draw per row from softmax(logits) by inverting the CDF at ``u_x`` in [0, 1) (one
    uniform per row). Filtered (-inf) entries have zero mass and are never drawn. The sampler
    draws every scale's uniforms at once, so the compiled program holds one random-bits
    computation instead of one per scale."""
    probs = jax.nn.softmax(logits_xV.astype(jnp.float32), axis=-1)
    cdf = _cdf_blocked(probs)
    u = u_x.astype(jnp.float32)[..., None] * cdf[..., -1:]
    u = jnp.maximum(u, jnp.finfo(jnp.float32).tiny)  # u = 0 would pick a zero-mass entry 0
    index = jnp.sum(cdf < u, axis=-1)
    return jnp.minimum(index, logits_xV.shape[-1] - 1).astype(jnp.int32)


def sample_categorical(key, logits_xV):
    """One draw per row from softmax(logits): :func:`categorical_from_uniform` with a fresh
    uniform per row. The same distribution as ``jax.random.categorical`` (which draws a Gumbel
    per logit: L x V random numbers, a noticeable part of CPU sampling time)."""
    return categorical_from_uniform(
        jax.random.uniform(key, logits_xV.shape[:-1], jnp.float32), logits_xV)


def gumbel_softmax(key, logits, tau, *, gumbels=None):
    """Soft (non-hard) Gumbel-softmax over the last axis; ``gumbels``: the noise, if drawn
    already (else drawn from ``key`` at the logits' shape)."""
    if gumbels is None:
        gumbels = jax.random.gumbel(key, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + gumbels) / tau, axis=-1)


def draw_scale_tokens(logits_2BxlxV, u_Bxl, t, top_k: int, top_p=None, *,
                      chunk: int | None = None, with_logits: bool = False):
    """One scale's draw: guidance (:func:`cfg_mix` at ``t``), :func:`filter_top_k_top_p`, one
    :func:`categorical_from_uniform` draw per token -> (idx (B, l) int32, the filtered logits
    (B, l, V) if ``with_logits`` else None).

    ``chunk`` (static) None: at the scale's own shape. An int: the tokens are padded to a
    multiple of ``chunk`` and drawn ``chunk`` at a time under ``lax.map``, so that every
    scale runs the same computation at the same shape and XLA compiles its kernels once for
    the whole sampler instead of once per scale (the filters' bisection loops are most of the
    sampler's compile time after the blocks). Each token's draw is the same function of its
    logits and uniform either way; padded tokens (zero logits) are drawn and dropped.
    """
    two_b, length, vocab = logits_2BxlxV.shape

    def draw(logits_2BxcxV, u_Bxc):
        logits = filter_top_k_top_p(cfg_mix(logits_2BxcxV, t), top_k, top_p)
        return categorical_from_uniform(u_Bxc, logits), (logits if with_logits else None)

    if chunk is None:
        return draw(logits_2BxlxV, u_Bxl)
    n = -(-length // chunk)
    pad = n * chunk - length
    logits = jnp.pad(logits_2BxlxV, ((0, 0), (0, pad), (0, 0)))
    u = jnp.pad(u_Bxl, ((0, 0), (0, pad)))
    if n == 1:  # the same kernels without a one-step loop
        idx, filtered = draw(logits, u)
    else:  # chunks first: (n, 2B, chunk, V) and (n, B, chunk)
        idx, filtered = jax.lax.map(
            lambda args: draw(*args),
            (logits.reshape(two_b, n, chunk, vocab).swapaxes(0, 1),
             u.reshape(u.shape[0], n, chunk).swapaxes(0, 1)))
        idx = idx.swapaxes(0, 1).reshape(u.shape)
        if with_logits:
            filtered = filtered.swapaxes(0, 1).reshape(u.shape + (vocab,))
    return idx[:, :length], (filtered[:, :length] if with_logits else None)


# Tokens per draw in the sampler on a CPU (see draw_scale_tokens): one compiled set of filter
# kernels for all scales instead of one per scale. Measured on a 2-core Intel Xeon (d16,
# batch 1, vocabulary 4096): the ten scales' filters and draws compile in 0.8 s instead of
# 3.5-3.8 s, and run in about the same time as at each scale's own shape (64 tokens: 5 ms a
# chunk; the last scale's 256 at once: 29 ms). Other backends keep each scale's own shape
# (one call per scale, no sequential chunks: their compile time was not measured with it).
_CPU_DRAW_CHUNK = 64


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 matrix of torch bilinear resizing (align_corners=False, no antialias)."""
    return interp.resize_matrix(src, dst, "bilinear")


def edit_keep_masks(keep_mask, patch_nums, batch: int) -> list[jax.Array]:
    """Per scale, (B, pn*pn) bool: where the reference token is kept.

    ``keep_mask``: (H, W) or (B, H, W), any resolution, 1 / True = keep the reference. Resized
    bilinearly and thresholded at 0.5 as the official notebook; scales with pn**2 <= 3 keep it
    all.
    """
    mask = jnp.asarray(keep_mask, jnp.float32)
    if mask.ndim == 2:
        mask = jnp.broadcast_to(mask, (batch,) + mask.shape)
    if mask.ndim != 3 or mask.shape[0] != batch:
        raise ValueError(f"keep_mask must be (H, W) or (B={batch}, H, W), got shape "
                         f"{np.shape(keep_mask)}")
    out = []
    for pn in patch_nums:
        if pn * pn <= 3:
            out.append(jnp.ones((batch, pn * pn), bool))
            continue
        rows = jnp.asarray(bilinear_matrix(mask.shape[1], pn), jnp.float32)
        cols = jnp.asarray(bilinear_matrix(mask.shape[2], pn), jnp.float32)
        small = jnp.einsum("ph,bhw,qw->bpq", rows, mask, cols)
        out.append((small > 0.5).reshape(batch, pn * pn))
    return out


# ----------------------------------------------------------------------------------------------
# The jitted sampler.

def _check_labels(labels_B, num_classes: int) -> jax.Array:
    labels = jnp.asarray(labels_B)
    if labels.ndim != 1 or labels.shape[0] < 1:
        raise ValueError(f"labels_B must be a non-empty 1-D array of class ids, got shape "
                         f"{labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels_B must be integers, got dtype {labels.dtype}")
    if not isinstance(labels, jax.core.Tracer):
        bad = np.asarray(labels)
        bad = bad[(bad < 0) | (bad > num_classes)]
        if bad.size:
            raise ValueError(f"labels_B must be in [0, {num_classes}] ({num_classes} = "
                             f"unconditional), got {bad.tolist()[:8]}")
    return labels.astype(jnp.int32)


def _check_options(vocab: int, top_k, top_p, cfg, guidance_power=1.0):
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an int (0 = off), got {top_k!r}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, {vocab}] (the vocabulary size), got {top_k}")
    if not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p}")
    if not math.isfinite(float(cfg)):
        raise ValueError(f"cfg must be a finite number, got {cfg}")
    checks.non_negative_number("guidance_power", guidance_power)


def _as_key(key):
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if not (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise ValueError(f"key must be a jax.random.key(...) or an int seed, got {key!r}")
    return key


def _scale_ratio(scale_index: int, num_scales: int) -> np.float32:
    """k / (K - 1), the guidance ramp's position (0 for a one-scale schedule), in float32 as
    both samplers compute with it."""
    return np.float32(scale_index / (num_scales - 1) if num_scales > 1 else 0.0)


def _token_gumbels(key, positions_P, batch: int, vocab: int) -> jax.Array:
    """Gumbel noise (B, P, V) for the tokens at ``positions`` (traced is fine): each token's
    noise is a function of the key and its position alone, so a scale drawn at its own shape
    and the same scale padded in a bucket get the same noise."""
    noise = jax.vmap(lambda p: jax.random.gumbel(jax.random.fold_in(key, p), (batch, vocab),
                                                 jnp.float32))(positions_P)
    return noise.swapaxes(0, 1)


def _soft_codes(gumbels_BxlxV, filtered_BxlxV, ratio, codebook_VxC):
    """``more_smooth``: the Gumbel-softmax mixture of codes (tau = max(0.27 (1 - 0.95 ratio),
    0.005), logits x (1 + ratio)), (B, l, C) float32."""
    tau = jnp.maximum(0.27 * (1 - 0.95 * ratio), 0.005)
    soft = gumbel_softmax(None, filtered_BxlxV * (1 + ratio), tau, gumbels=gumbels_BxlxV)
    return jnp.einsum("blv,vc->blc", soft, codebook_VxC.astype(jnp.float32))


def _draw_and_embed(logits_2BxlxV, uniforms_Bxl, positions_l, *, cfg, guidance_power, ratio,
                    top_k, top_p, draw_chunk, gumbel_key, codebook, ref_idx=None, keep=None):
    """One scale's tokens from its logits and their code vectors -> (idx (B, l), h (B, l, C)
    in the codebook's dtype), the same for a scale at its own shape and padded in a bucket."""
    # A traced power: changing it does not recompile. 0 ** 0 = 1 (constant guidance).
    guidance = cfg * jnp.power(ratio, guidance_power)
    more_smooth = gumbel_key is not None
    idx, filtered = draw_scale_tokens(logits_2BxlxV, uniforms_Bxl, guidance, top_k, top_p,
                                      chunk=draw_chunk, with_logits=more_smooth)
    if more_smooth:
        gumbels = _token_gumbels(gumbel_key, positions_l, idx.shape[0], codebook.shape[0])
        h = _soft_codes(gumbels, filtered, ratio, codebook)
    else:
        h = codebook[idx]
    if keep is not None:
        idx = jnp.where(keep, ref_idx, idx)
        h = jnp.where(keep[..., None], codebook[ref_idx].astype(h.dtype), h)
    return idx, h.astype(codebook.dtype)


def _bucket_tables(patch_nums, bucket) -> dict:
    """Per scale of ``bucket`` (leading axis), what its shared step reads: the scale, its token
    range and guidance ratio, the area-downsampling (side, n) and bicubic-upsampling (n, side)
    matrices of its pn x pn map zero-padded to the bucket's side (the identity at pn = n, as
    ``interp.resize``), and where each token sits in the side x side grid and back."""
    layout = scales.token_layout(patch_nums)
    n, side = patch_nums[-1], bucket.side
    rows = {name: [] for name in ("scale", "begin", "end", "ratio", "down", "up",
                                  "cell_of_token", "token_of_cell")}
    for k in bucket.scales:
        pn = patch_nums[k]
        down = np.zeros((side, n))
        up = np.zeros((n, side))
        down[:pn] = np.eye(n) if pn == n else interp.resize_matrix(n, pn, "area")
        up[:, :pn] = np.eye(n) if pn == n else interp.resize_matrix(pn, n, "bicubic")
        t = np.arange(side * side)
        cell_of_token = np.where(t < pn * pn, (t // pn) * side + t % pn, 0)
        i, j = t // side, t % side
        token_of_cell = np.where((i < pn) & (j < pn), i * pn + j, 0)
        for name, value in (("scale", k), ("begin", layout.begin_ends[k][0]),
                            ("end", layout.begin_ends[k][1]),
                            ("ratio", _scale_ratio(k, layout.num_scales)), ("down", down),
                            ("up", up), ("cell_of_token", cell_of_token),
                            ("token_of_cell", token_of_cell)):
            rows[name].append(value)
    dtypes = {"ratio": np.float32, "down": np.float64, "up": np.float64}
    return {name: np.asarray(values, dtypes.get(name, np.int32))
            for name, values in rows.items()}


def _scales_one_by_one(var, vae, cond, states, draw):
    """Each scale at its own shapes (unrolled): the looped layout's and the low-rank backends'
    sampler, and the reference the bucketed one is tested against."""
    patch_nums = var.config.patch_nums
    batch = cond.cond.shape[0] // 2
    tokens = var.embed_scale(0, cond)
    f_hat, token_maps = None, []
    for si, pn in enumerate(patch_nums):
        begin, end = var.begin_ends[si]
        logits_2B, states = var.decode_scale(tokens, cond, states, si)
        idx, h = draw(si, logits_2B, begin, jnp.arange(begin, end), end - begin,
                      _scale_ratio(si, len(patch_nums)))
        token_maps.append(idx.reshape(batch, pn, pn))
        f_hat, x_next = vae.next_scale_input(si, f_hat, h.reshape(batch, pn, pn, -1))
        if x_next is not None:
            nxt = var.embed_scale(si + 1, cond, x_next)
            tokens = jnp.concatenate([nxt, nxt], axis=0)
    return token_maps, f_hat


def _scales_in_buckets(var, vae, cond, states, draw, buckets):
    """The scales of each bucket (``scales.sampling_buckets``) as one ``lax.scan`` over one
    step at the bucket's shape, the scale's offsets and matrices read from its tables: the
    compiled program holds a transformer, head, draw and quantizer step per bucket instead of
    per scale. The same tokens as :func:`_scales_one_by_one` (to rounding of the resizes)."""
    patch_nums = var.config.patch_nums
    batch = cond.cond.shape[0] // 2
    codebook = vae.codebook
    n = patch_nums[-1]
    highest = jax.lax.Precision.HIGHEST
    f_hat = jnp.zeros((batch, n, n, codebook.shape[1]), codebook.dtype)
    token_maps = [None] * len(patch_nums)
    for bucket in buckets:
        rows, side = bucket.rows, bucket.side
        tables = {name: jnp.asarray(value, codebook.dtype if value.dtype == np.float64
                                    else value.dtype)
                  for name, value in _bucket_tables(patch_nums, bucket).items()}
        starts = bucket.scales[0] == 0

        def step(carry, t, rows=rows, side=side, starts=starts, read_len=bucket.read_len):
            f_hat, states = carry
            grid = jnp.einsum("ih,bhwc,jw->bijc", t["down"], f_hat, t["down"], precision=highest)
            x_in = grid.reshape(batch, rows, -1)[:, t["cell_of_token"]]
            tokens = var.embed_rows(t["begin"], rows, cond, x_in,
                                    t["scale"] == 0 if starts else None)
            logits_2B, states = var.decode_rows(tokens, cond, states, t["begin"], t["end"],
                                                read_len)
            idx, h = draw(t["scale"], logits_2B, t["begin"], t["begin"] + jnp.arange(rows), rows,
                          t["ratio"])
            h_grid = h[:, t["token_of_cell"]].reshape(batch, side, side, -1)
            up = jnp.einsum("hi,bijc,wj->bhwc", t["up"], h_grid, t["up"], precision=highest)
            return (f_hat + vae.phi(t["scale"], up), states), idx

        (f_hat, states), idx_SxBxP = jax.lax.scan(step, (f_hat, states), tables)
        for j, k in enumerate(bucket.scales):
            pn = patch_nums[k]
            token_maps[k] = idx_SxBxP[j, :, :pn * pn].reshape(batch, pn, pn)
    return token_maps, f_hat


@functools.lru_cache(maxsize=32)
def _compiled(var_graphdef, vae_graphdef, top_k: int, use_top_p: bool, more_smooth: bool,
              editing: bool, buckets: tuple | None):
    def run(var_state, vae_state, labels_B, key, cfg, guidance_power, top_p, ref_maps,
            keep_masks, layer_kernels):
        var = nnx.merge(var_graphdef, var_state)
        vae = nnx.merge(vae_graphdef, vae_state)
        config = var.config
        batch = labels_B.shape[0]
        codebook = vae.codebook
        labels_2B = jnp.concatenate([labels_B, jnp.full_like(labels_B, config.num_classes)])
        cond = var.decode_condition(var.condition(labels_2B), layer_kernels)  # AdaLN once
        states = var.init_decode_states(2 * batch)
        # Every token's uniform drawn up front: one random-bits computation in the compiled
        # program instead of a key split and a draw at each scale's shapes (padded for the
        # buckets' last rows).
        key_idx, key_gumbel = jax.random.split(key)
        uniforms_BxL = jax.random.uniform(key_idx, (batch, config.seq_len), jnp.float32)
        uniforms_BxL = jnp.pad(uniforms_BxL, ((0, 0), (0, config.patch_nums[-1] ** 2)))
        if editing:  # per scale (B, l), padded to the finest scale's tokens
            pad = config.patch_nums[-1] ** 2
            ref_all = jnp.stack([jnp.pad(r, ((0, 0), (0, pad - r.shape[1]))) for r in ref_maps])
            keep_all = jnp.stack([jnp.pad(m, ((0, 0), (0, pad - m.shape[1])))
                                  for m in keep_masks])

        def draw(scale, logits_2B, begin, positions, rows, ratio):
            ref_idx = keep = None
            if editing:
                ref_idx = jax.lax.dynamic_slice_in_dim(ref_all[scale], 0, rows, axis=1)
                keep = jax.lax.dynamic_slice_in_dim(keep_all[scale], 0, rows, axis=1)
            return _draw_and_embed(
                logits_2B, jax.lax.dynamic_slice_in_dim(uniforms_BxL, begin, rows, axis=1),
                positions, cfg=cfg, guidance_power=guidance_power, ratio=ratio, top_k=top_k,
                top_p=top_p if use_top_p else None,
                draw_chunk=_CPU_DRAW_CHUNK if jax.default_backend() == "cpu" else None,
                gumbel_key=key_gumbel if more_smooth else None, codebook=codebook,
                ref_idx=ref_idx, keep=keep)

        if buckets is None:
            return _scales_one_by_one(var, vae, cond, states, draw)
        return _scales_in_buckets(var, vae, cond, states, draw, buckets)

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _compiled_decoder(vae_graphdef, compiler_options: tuple):
    def decode(vae_state, f_hat):
        vae = nnx.merge(vae_graphdef, vae_state)
        return (vae.decode_features(f_hat).astype(jnp.float32) + 1) * 0.5

    return xla_options.jit(decode, compiler_options)


def decode_images(vae_graphdef, vae_state, f_hat_BxnxnxC) -> jax.Array:
    """The VQ-VAE decoder as the sampler runs it: f_hat (B, n, n, Cvae) -> images (B, H, W, 3)
    in [0, 1], jit-compiled once per (model, shape), with the convolution options of
    :mod:`var_jax.xla_options` where they apply (a CPU, float32 weights). Called while an
    outer ``jax.jit`` traces (the sampler inside a caller's jit), it becomes part of that
    program, whose options are the caller's (JAX accepts compiler options on the outermost
    jit only)."""
    options = xla_options.convolution_options_for(vae_state)
    return _compiled_decoder(vae_graphdef, options)(vae_state, f_hat_BxnxnxC)


def _choose_buckets(var_model, scale_buckets: bool):
    """The sampler's ``scales.sampling_buckets``, or None for one step per scale."""
    if not isinstance(scale_buckets, bool):
        raise ValueError(f"scale_buckets must be True or False, got {scale_buckets!r}")
    if not scale_buckets:
        return None
    config = var_model.config
    if not config.scan_layers or attention.registry.get(config.attention[0]).step_rows is None:
        raise ValueError("scale_buckets=True needs the scanned layout (VARConfig.scan_layers) "
                         "and a KV-cache attention backend (exact, flash), got scan_layers="
                         f"{config.scan_layers}, attention {config.attention[0]!r}")
    return scales.sampling_buckets(config.patch_nums)


class Sampler:
    """A VAR + VQ-VAE pair split once into (graph, state), ready for repeated jitted sampling.

    ``__call__(labels_B, key, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
    reference_maps=None, keep_masks=None, guidance_power=1.0)``; each distinct (top_k, top_p > 0,
    more_smooth, editing) compiles once per input shape.

    ``scale_buckets``: run the scales in buckets (``scales.sampling_buckets``: one compiled
    step per bucket of scales padded to a shared shape, instead of one per scale), which needs
    the scanned layout and a KV-cache attention backend (exact, flash). The same tokens, to the
    rounding of the resizes; a trade: on a 2-core CPU (d16, batch 1) the first call compiles
    in about two thirds of the time and every call runs about 13% longer (the padded rows;
    docs/scan_layers.md), so it is off by default. Not measured on an accelerator, where the
    padded rows of the small scales should cost little and the compile is longer.
    """

    def __init__(self, var_model, vqvae_model, *, scale_buckets: bool = False):
        var_cfg, vae_cfg = var_model.config, vqvae_model.config
        if tuple(var_cfg.patch_nums) != tuple(vae_cfg.patch_nums):
            raise ValueError(f"VAR patch_nums {var_cfg.patch_nums} differ from the VQ-VAE's "
                             f"{vae_cfg.patch_nums}")
        if var_cfg.cvae != vae_cfg.z_channels or var_cfg.vocab_size != vae_cfg.vocab_size:
            raise ValueError(f"VAR (cvae {var_cfg.cvae}, vocab {var_cfg.vocab_size}) does not fit "
                             f"the VQ-VAE (z_channels {vae_cfg.z_channels}, vocab "
                             f"{vae_cfg.vocab_size})")
        self.config = var_cfg
        self.buckets = _choose_buckets(var_model, scale_buckets)
        self.var_graphdef, self.var_state = nnx.split(var_model)
        # On a CPU the scanned layers read their matmul kernels in place, one array per layer
        # (split once here, without copying), instead of copying a slice of each stacked
        # kernel at every layer of every scale (models.var.LayerKernels).
        self.layer_kernels = (LayerKernels.split(var_model.blocks)
                              if var_cfg.scan_layers and jax.default_backend() == "cpu"
                              else None)
        self.vae_graphdef, self.vae_state = nnx.split(vqvae_model)

    def __call__(self, labels_B, key, *, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
                 reference_maps=None, keep_masks=None, guidance_power=1.0):
        config = self.config
        labels = _check_labels(labels_B, config.num_classes)
        _check_options(config.vocab_size, top_k, top_p, cfg, guidance_power)
        editing = reference_maps is not None
        if editing:
            if keep_masks is None or len(keep_masks) != config.num_scales \
                    or len(reference_maps) != config.num_scales:
                raise ValueError(f"editing needs {config.num_scales} reference maps and keep "
                                 "masks (see edit_keep_masks)")
            ref = [jnp.reshape(jnp.asarray(r, jnp.int32), (labels.shape[0], -1))
                   for r in reference_maps]
            masks = [jnp.asarray(m, bool) for m in keep_masks]
        else:
            ref, masks = None, None
        fn = _compiled(self.var_graphdef, self.vae_graphdef, int(top_k), float(top_p) > 0,
                       bool(more_smooth), editing, self.buckets)
        token_maps, f_hat = fn(self.var_state, self.vae_state, labels, _as_key(key),
                               jnp.float32(cfg), jnp.float32(guidance_power),
                               jnp.float32(top_p), ref, masks,
                               self.layer_kernels)
        return token_maps, decode_images(self.vae_graphdef, self.vae_state, f_hat)


def sample(var_model, vqvae_model, labels_B, *, key, cfg=1.5, top_k=900, top_p=0.96,
           more_smooth=False, guidance_power=1.0):
    """Samples one image per label -> (token maps [(B, pn, pn) int32], images (B, H, W, 3) in
    [0, 1]). ``key``: a ``jax.random.key`` or an int seed; same key, same images."""
    return Sampler(var_model, vqvae_model)(labels_B, key, cfg=cfg, top_k=top_k, top_p=top_p,
                                           more_smooth=more_smooth,
                                           guidance_power=guidance_power)


def edit(var_model, vqvae_model, labels_B, reference_maps, keep_mask, *, key, cfg=3.0,
         top_k=900, top_p=0.95, more_smooth=True):
    """Zero-shot editing: keeps ``reference_maps`` where ``keep_mask`` is 1 and samples the rest.

    ``reference_maps``: the reference image's K token maps (e.g. ``vqvae.images_to_indices``);
    ``keep_mask``: (H, W) or (B, H, W) at any resolution, 1 = keep. In-painting: 0 inside the
    hole; out-painting: 1 inside the kept region; class-conditional editing: any label.
    Defaults are the official notebook's. Returns (token maps, images in [0, 1]).
    """
    labels = jnp.asarray(labels_B)
    masks = edit_keep_masks(keep_mask, var_model.config.patch_nums, labels.shape[0])
    return Sampler(var_model, vqvae_model)(labels, key, cfg=cfg, top_k=top_k, top_p=top_p,
                                           more_smooth=more_smooth, reference_maps=reference_maps,
                                           keep_masks=masks)


__all__ = ["Sampler", "sample", "edit", "cfg_mix", "filter_top_k_top_p", "sample_categorical",
           "categorical_from_uniform", "decode_images",
           "gumbel_softmax",
           "bilinear_matrix", "edit_keep_masks"]
