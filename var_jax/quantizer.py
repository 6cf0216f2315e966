"""Multi-scale residual quantisation of VAR (pure functions, NHWC, float32).

A latent ``f`` (B, n, n, C) becomes K token maps r_1..r_K of sides ``patch_nums`` (1 ... n). At
scale k the residual is area-downsampled to pn_k, each vector is replaced by its nearest code,
the codes are bicubic-upsampled back to n x n, passed through Phi_k and subtracted; their running
sum is ``f_hat``. The VAR transformer's input for scale k+1 is the area-downsampled running
``f_hat`` after scale k (continuous, not the code embeddings), during training
(:func:`teacher_forcing_inputs`) and sampling (:func:`next_scale_input`) alike, which is why
both are built from one step function here.

``phi`` is supplied by the model: ``phi(scale_index, h_BxnxnxC) -> BxnxnxC`` (the partially
shared Phi convs with their residual mixing). ``patch_nums`` must be a static tuple of ints.

Indices are accepted as a list of K arrays shaped (B, pn, pn) or (B, pn*pn), or one (B, L) array
(scales concatenated, row-major inside each scale); they are returned as a list of (B, pn, pn)
int32. Out-of-vocabulary indices raise ValueError when the indices are concrete (not traced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import interp, scales

Phi = Callable[[int, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Validation.

def _check_patch_nums(patch_nums) -> tuple[int, ...]:
    return scales.validate_schedule(patch_nums)


def _check_codebook(codebook_VxC) -> tuple[int, int]:
    if getattr(codebook_VxC, "ndim", None) != 2:
        raise ValueError("codebook must be (V, C), got shape "
                         f"{getattr(codebook_VxC, 'shape', type(codebook_VxC).__name__)}")
    return tuple(codebook_VxC.shape)


def _check_features(name: str, f_BxhxwxC, patch_nums, channels: int) -> None:
    shape = getattr(f_BxhxwxC, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{name} must be (B, h, w, C) features, got shape {shape}")
    _, h, w, c = shape
    if h != w:
        raise ValueError(f"{name} must be square, got {h}x{w}")
    if h != patch_nums[-1]:
        raise ValueError(f"patch_nums must end at the latent side: {name} is {h}x{w} but "
                         f"patch_nums={tuple(patch_nums)} ends at {patch_nums[-1]}")
    if c != channels:
        raise ValueError(f"{name} has {c} channels but the codebook has {channels}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def as_index_maps(indices, patch_nums, vocab_size: int | None = None) -> list[jax.Array]:
    """Normalises indices to a list of K (B, pn, pn) int32 arrays (see the module docstring)."""
    patch_nums = _check_patch_nums(patch_nums)
    layout = scales.token_layout(patch_nums)
    if isinstance(indices, (list, tuple)):
        if len(indices) != len(patch_nums):
            raise ValueError(f"indices: expected one array per scale ({len(patch_nums)} for "
                             f"patch_nums={patch_nums}), got {len(indices)}")
        parts = list(indices)
    else:
        shape = getattr(indices, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] != layout.seq_len:
            raise ValueError("indices: expected a list of per-scale maps or one (B, "
                             f"L={layout.seq_len}) array for patch_nums={patch_nums}, got shape "
                             f"{shape}")
        parts = [indices[:, b:e] for b, e in layout.begin_ends]
    out = []
    batch = None
    for k, (pn, part) in enumerate(zip(patch_nums, parts, strict=True)):
        part = part if isinstance(part, jax.Array) else np.asarray(part)
        if not (jnp.issubdtype(part.dtype, jnp.integer)):
            raise ValueError(f"indices[{k}] must hold integers, got dtype {part.dtype}")
        if part.ndim == 2 and part.shape[1] == pn * pn:
            part = part.reshape(part.shape[0], pn, pn)
        if part.ndim != 3 or part.shape[1:] != (pn, pn):
            raise ValueError(f"indices[{k}] must be (B, {pn}, {pn}) or (B, {pn * pn}), got shape "
                             f"{tuple(part.shape)}")
        if batch is None:
            batch = part.shape[0]
        elif part.shape[0] != batch:
            raise ValueError(f"indices[{k}] has batch {part.shape[0]}, indices[0] has {batch}")
        if vocab_size is not None and _is_concrete(part) and part.size:
            lo, hi = int(np.min(part)), int(np.max(part))
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"indices[{k}] must lie in [0, {vocab_size}) (the vocabulary), "
                                 f"found values in [{lo}, {hi}]")
        out.append(jnp.asarray(part, jnp.int32))
    return out


# ----------------------------------------------------------------------------------------------
# The pieces.

def nearest_code(z_NxC: jax.Array, codebook_VxC: jax.Array) -> jax.Array:
    """idx_N (int32) of the nearest code in plain L2, computed in float32 without gradient.

    Uses ||z||^2 + ||e||^2 - 2 z.e like the official code, so near-ties resolve the same way.
    """
    z = jax.lax.stop_gradient(jnp.asarray(z_NxC, jnp.float32))
    e = jax.lax.stop_gradient(jnp.asarray(codebook_VxC, jnp.float32))
    dist_NxV = (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(e * e, axis=1)[None, :]
                - 2.0 * jnp.matmul(z, e.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(dist_NxV, axis=1).astype(jnp.int32)


def embed(idx_Bxpnxpn: jax.Array, codebook_VxC: jax.Array) -> jax.Array:
    """Code vectors of an index map: (B, pn, pn) -> (B, pn, pn, C) (differentiable in codebook)."""
    return jnp.take(codebook_VxC, idx_Bxpnxpn, axis=0)


def _upsample_phi(scale_index: int, h_BxpnxpnxC, phi: Phi, side: int) -> jax.Array:
    return phi(scale_index, interp.resize(h_BxpnxpnxC, (side, side), "bicubic"))


def _quantize_residual(f_BxhxwxC, codebook_VxC, phi, patch_nums):
    """Yields (scale index, idx (B,pn,pn), f_hat after this scale) for the residual encoding."""
    batch, side, _, channels = f_BxhxwxC.shape
    f_rest = jax.lax.stop_gradient(f_BxhxwxC)
    f_hat = jnp.zeros_like(f_BxhxwxC)
    for k, pn in enumerate(patch_nums):
        z_BxpnxpnxC = interp.resize(f_rest, (pn, pn), "area")
        idx = nearest_code(z_BxpnxpnxC.reshape(-1, channels), codebook_VxC).reshape(batch, pn, pn)
        h = _upsample_phi(k, embed(idx, codebook_VxC), phi, side)
        f_hat = f_hat + h
        f_rest = f_rest - jax.lax.stop_gradient(h)
        yield k, idx, f_hat


def encode(f_BxhxwxC: jax.Array, codebook_VxC: jax.Array, phi: Phi, patch_nums
           ) -> tuple[list[jax.Array], jax.Array]:
    """Multi-scale residual encoding: (indices list of (B, pn, pn) int32, f_hat (B, n, n, C)).

    No gradient flows (use :func:`quantize` for training).
    """
    patch_nums = _check_patch_nums(patch_nums)
    _, channels = _check_codebook(codebook_VxC)
    _check_features("f", f_BxhxwxC, patch_nums, channels)
    steps = list(_quantize_residual(f_BxhxwxC, codebook_VxC, phi, patch_nums))
    return [idx for _, idx, _ in steps], jax.lax.stop_gradient(steps[-1][2])


def next_scale_input(scale_index: int, f_hat_BxhxwxC: jax.Array | None, h_BxpnxpnxC: jax.Array,
                     phi: Phi, patch_nums) -> tuple[jax.Array, jax.Array | None]:
    """One sampling step: f_hat += Phi_k(up(h)); the next scale's input is down(f_hat).

    ``h`` is the (B, pn_k, pn_k, C) embedding of scale k's codes (or a soft embedding);
    ``f_hat`` None means zeros. Returns (f_hat_new, x_next (B, pn_{k+1}**2, C)), with x_next None
    after the last scale. ``scale_index`` must be a Python int.
    """
    patch_nums = _check_patch_nums(patch_nums)
    if not isinstance(scale_index, (int, np.integer)) or not 0 <= scale_index < len(patch_nums):
        raise ValueError(f"scale_index must be an int in [0, {len(patch_nums)}), "
                         f"got {scale_index!r}")
    pn, side = patch_nums[scale_index], patch_nums[-1]
    shape = getattr(h_BxpnxpnxC, "shape", None)
    if shape is None or len(shape) != 4 or shape[1:3] != (pn, pn):
        raise ValueError(f"h must be (B, {pn}, {pn}, C) at scale {scale_index}, got shape {shape}")
    if f_hat_BxhxwxC is None:
        f_hat_BxhxwxC = jnp.zeros((shape[0], side, side, shape[3]), h_BxpnxpnxC.dtype)
    _check_features("f_hat", f_hat_BxhxwxC, patch_nums, shape[3])
    f_hat = f_hat_BxhxwxC + _upsample_phi(scale_index, h_BxpnxpnxC, phi, side)
    if scale_index == len(patch_nums) - 1:
        return f_hat, None
    nxt = patch_nums[scale_index + 1]
    x_next = interp.resize(f_hat, (nxt, nxt), "area")
    return f_hat, x_next.reshape(x_next.shape[0], nxt * nxt, x_next.shape[3])


def indices_to_fhat(indices, codebook_VxC: jax.Array, phi: Phi, patch_nums) -> jax.Array:
    """f_hat (B, n, n, C) = sum_k Phi_k(up(codebook[r_k])), n = patch_nums[-1]."""
    patch_nums = _check_patch_nums(patch_nums)
    vocab, _ = _check_codebook(codebook_VxC)
    maps = as_index_maps(indices, patch_nums, vocab)
    f_hat = None
    for k, idx in enumerate(maps):
        f_hat, _ = next_scale_input(k, f_hat, embed(idx, codebook_VxC), phi, patch_nums)
    return f_hat


def teacher_forcing_inputs(indices, codebook_VxC: jax.Array, phi: Phi, patch_nums) -> jax.Array:
    """The VAR transformer inputs for scales 1..K-1: (B, L - 1, C) float32.

    Scale k+1's rows are the area-downsampled running f_hat after scale k, row-major; exactly
    the inputs :func:`next_scale_input` gives the sampler for the same codes.
    """
    patch_nums = _check_patch_nums(patch_nums)
    vocab, channels = _check_codebook(codebook_VxC)
    maps = as_index_maps(indices, patch_nums, vocab)
    f_hat, parts = None, []
    for k, idx in enumerate(maps[:-1]):
        f_hat, x_next = next_scale_input(k, f_hat, embed(idx, codebook_VxC), phi, patch_nums)
        parts.append(x_next)
    if not parts:
        return jnp.zeros((maps[0].shape[0], 0, channels), codebook_VxC.dtype)
    return jnp.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------------------
# Training.

class QuantizeOutput(NamedTuple):
    """What :func:`quantize` returns for tokenizer training."""

    f_hat: jax.Array  # (B, n, n, C) straight-through: value of f_hat, gradient of f
    vq_loss: jax.Array  # scalar: mean over scales of beta * commitment + codebook loss
    vq_loss_per_scale: jax.Array  # (K,)
    indices: list[jax.Array]  # K arrays (B, pn, pn) int32
    hits_KxV: jax.Array  # (K, V) int32: how often each code was chosen at each scale


def straight_through(f_hat: jax.Array, f: jax.Array) -> jax.Array:
    """f_hat's value with f's gradient (``sg(f_hat) - sg(f) + f``, as the official code)."""
    return jax.lax.stop_gradient(f_hat) - jax.lax.stop_gradient(f) + f


def quantize(f_BxhxwxC: jax.Array, codebook_VxC: jax.Array, phi: Phi, patch_nums, *,
             beta: float = 0.25) -> QuantizeOutput:
    """The tokenizer-training forward of the quantizer, differentiable and jit-able.

    Per scale k, with f_hat_k the running sum after k scales:
    ``loss_k = beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))`` (commitment to the encoder,
    codebook and Phi from the second term); ``vq_loss`` is their mean over scales.
    """
    patch_nums = _check_patch_nums(patch_nums)
    vocab, channels = _check_codebook(codebook_VxC)
    _check_features("f", f_BxhxwxC, patch_nums, channels)
    f = f_BxhxwxC
    f_sg = jax.lax.stop_gradient(f)
    indices, losses, hits = [], [], []
    f_hat = None
    for _, idx, f_hat in _quantize_residual(f, codebook_VxC, phi, patch_nums):
        indices.append(idx)
        hits.append(jnp.bincount(idx.reshape(-1), length=vocab).astype(jnp.int32))
        commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
        codebook = jnp.mean(jnp.square(f_hat - f_sg))
        losses.append(beta * commitment + codebook)
    per_scale = jnp.stack(losses)
    return QuantizeOutput(straight_through(f_hat, f), jnp.mean(per_scale), per_scale, indices,
                          jnp.stack(hits))


def code_usage(hits_KxV) -> np.ndarray:
    """Per-scale fraction of the vocabulary used at least once: (K,) float64 in [0, 1]."""
    hits = np.asarray(hits_KxV)
    return (hits > 0).mean(axis=1)


def index_hits(indices, vocab_size: int, patch_nums) -> jax.Array:
    """(K, V) int32 counts of each code per scale, for any accepted index format."""
    maps = as_index_maps(indices, patch_nums, vocab_size)
    return jnp.stack([jnp.bincount(m.reshape(-1), length=vocab_size).astype(jnp.int32)
                      for m in maps])


def flatten_indices(indices: Sequence[jax.Array], patch_nums) -> jax.Array:
    """Per-scale maps -> one (B, L) int32 array (scales concatenated, row-major)."""
    maps = as_index_maps(indices, patch_nums)
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)
