"""Decoding (sampling) state of one attention layer, fed one scale at a time.

exact / flash: a preallocated KV cache (B, L, H, D); scale k writes its keys and values at its
static offset and attends to the cache prefix [0, end_k). poly / favor: the running sums of the
prefix core (B, H, M, D), (B, H, M) and the stabiliser (B, H), O(M x D) per head whatever L is,
plus the random projection (M, D) for favor, drawn once per sampling run from the given rng.
auto: the state of the backend `plan` resolves to, remembering that "auto" was asked for.

`DecodeState` is a pytree whose arrays are its leaves; backend, schedule and options are static
metadata, so the state can be carried through `jax.jit` with the scale loop unrolled in Python.
Each backend's init and step live in `registry`; the full `block_causal_attention` call of the
low-rank backends runs the same step over all scales, so the two agree by construction (to
rounding for the others).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from var_jax import scales
from var_jax.attention import _checks, registry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    arrays: dict
    backend: str = dataclasses.field(metadata=dict(static=True))  # the backend that runs
    patch_nums: tuple = dataclasses.field(metadata=dict(static=True))
    options: tuple = dataclasses.field(metadata=dict(static=True))  # sorted (name, value) pairs
    # (backend, options) the caller asked for when it differs from what runs ("auto"), else ().
    requested: tuple = dataclasses.field(default=(), metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedScale:
    """Where a scale padded to more rows than its tokens sits (:func:`decode_rows`): its first
    token ``begin`` and its ``end``, traced ints, so that scales of different sizes share one
    compiled step."""

    begin: jax.Array
    end: jax.Array


def _frozen(options):
    return tuple(sorted(options.items()))


def init_decode_state(backend, batch, num_heads, head_dim, patch_nums, *, dtype=jnp.float32,
                      rng=None, **options) -> DecodeState:
    """An empty state for sampling with ``backend`` (see the module docstring)."""
    spec = registry.get(backend)
    sides = scales.validate_schedule(patch_nums)
    for name, value in (("batch", batch), ("num_heads", num_heads), ("head_dim", head_dim)):
        _checks.check_positive_int(name, value)
    opts = registry.complete_options(backend, options)
    layout = scales.token_layout(sides)
    requested = ()
    if spec.resolve is not None:
        requested = (backend, _frozen(opts))
        backend, chosen = spec.resolve(head_dim, layout, opts)
        spec, opts = registry.get(backend), registry.complete_options(backend, chosen)
    arrays = spec.init(batch, num_heads, head_dim, layout.seq_len, dtype, rng, opts)
    return DecodeState(arrays, backend, sides, _frozen(opts), requested)


def decode_scale(state: DecodeState, q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, scale_index: int, *,
                 backend, **options):
    """Attention of scale ``scale_index`` against itself and the coarser scales already fed.

    Returns (out_BxlxHxD in q's dtype, new_state). ``backend`` and any ``options`` given must
    match the state's (they are fixed when the state is made); a state made for "auto" takes
    backend="auto" and the options it was made with.
    """
    _check_call(state, backend, options)
    _checks.check_scale_qkv(q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, state.patch_nums, scale_index)
    begin, end = scales.token_layout(state.patch_nums).begin_ends[scale_index]
    out, arrays = registry.get(state.backend).step(state.arrays, q_BxlxHxD, k_BxlxHxD,
                                                   v_BxlxHxD, begin, end, dict(state.options))
    return out, dataclasses.replace(state, arrays=arrays)


def decode_rows(state: DecodeState, q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, begin, end, *, backend,
                **options):
    """:func:`decode_scale` for a scale padded to l rows at a traced offset: the rows' keys and
    values are written at ``begin`` and the keys [0, ``end``) of the state's cache are read
    (``begin``, ``end`` traced ints, l >= end - begin; the padded rows' outputs are to be
    dropped). The state may hold a cache cut at any length that covers the written rows.
    KV-cache backends only (``Backend.step_rows``); what the bucketed sampler runs.
    """
    _check_call(state, backend, options)
    spec = registry.get(state.backend)
    if spec.step_rows is None:
        able = [b for b in registry.backend_names() if registry.get(b).step_rows]
        raise ValueError(f"backend {state.backend!r} has no padded-rows step (KV-cache "
                         f"backends only: {able})")
    out, arrays = spec.step_rows(state.arrays, q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, begin, end,
                                 dict(state.options))
    return out, dataclasses.replace(state, arrays=arrays)


def _check_call(state: DecodeState, backend, options) -> None:
    """The backend and options of a decode call must be those the state was made with."""
    if state.requested and backend == state.requested[0]:
        fixed = dict(state.requested[1])
    elif backend == state.backend:
        fixed = dict(state.options)
    else:
        asked = state.requested[0] if state.requested else state.backend
        raise ValueError(f"backend {backend!r} does not match the decoding state's {asked!r}")
    for name, value in options.items():
        if name not in fixed or fixed[name] != value:
            raise ValueError(f"option {name}={value!r} differs from the decoding state's options "
                             f"{fixed}")
