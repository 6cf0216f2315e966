"""Decoding (sampling) state of one attention layer, fed one scale at a time.

exact / flash: a preallocated KV cache (B, L, H, D); scale k writes its keys and values at its
static offset and attends to the cache prefix [0, end_k). poly / favor: the running sums of the
prefix core (B, H, M, D), (B, H, M) and the stabiliser (B, H), O(M x D) per head whatever L is,
plus the random projection (M, D) for favor, drawn once per sampling run from the given rng.

`DecodeState` is a pytree whose arrays are its leaves; backend, schedule and options are static
metadata, so the state can be carried through `jax.jit` with the scale loop unrolled in Python.
The full `block_causal_attention` call of the low-rank backends runs this very decoder over all
scales, so the two agree by construction (to rounding for the others).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from var_jax import scales
from var_jax.attention import _checks, exact, favor, flash, poly, prefix

POLY_OPTIONS = ("degree", "approximation", "center", "logit_bound", "chunk", "group_tokens")
FAVOR_OPTIONS = ("num_features", "orthogonal", "chunk", "group_tokens")
FLASH_OPTIONS = ("implementation", "group_tokens")
EXACT_OPTIONS = ("query_block",)
OPTIONS = {"exact": EXACT_OPTIONS, "flash": FLASH_OPTIONS, "poly": POLY_OPTIONS,
           "favor": FAVOR_OPTIONS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    arrays: dict
    backend: str = dataclasses.field(metadata=dict(static=True))
    patch_nums: tuple = dataclasses.field(metadata=dict(static=True))
    options: tuple = dataclasses.field(metadata=dict(static=True))  # sorted (name, value) pairs


def check_options(backend, options):
    allowed = OPTIONS[backend]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"options {unknown} are not understood by backend {backend!r}; "
                         f"it takes {list(allowed)}")
    if "num_features" in options:
        _checks.check_positive_int("num_features", options["num_features"])
    if "chunk" in options and options["chunk"] is not None:
        _checks.check_positive_int("chunk", options["chunk"])
    if "group_tokens" in options:
        g = options["group_tokens"]
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"group_tokens must be a non-negative int, got {g!r}")
    if "degree" in options:
        d = options["degree"]
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"degree must be a non-negative int, got {d!r}")


def low_rank_map(backend, head_dim, options, projection=None):
    """(FeatureMap, chunk) of a low-rank backend."""
    opts = dict(options)
    chunk = opts.pop("chunk", None)
    opts.pop("group_tokens", None)  # only used by the full call
    if backend == "poly":
        fmap = poly.feature_map(head_dim, **opts)
    else:
        fmap = favor.feature_map(projection)
    return fmap, chunk


def init_decode_state(backend, batch, num_heads, head_dim, patch_nums, *, dtype=jnp.float32,
                      rng=None, **options) -> DecodeState:
    """An empty state for sampling with ``backend`` (see the module docstring)."""
    backend = _checks.check_backend(backend)
    if backend == "auto":
        raise ValueError("backend 'auto' has no decoding state of its own: resolve it with "
                         "attention.plan(...).backend first")
    sides = scales.validate_schedule(patch_nums)
    for name, value in (("batch", batch), ("num_heads", num_heads), ("head_dim", head_dim)):
        _checks.check_positive_int(name, value)
    check_options(backend, options)
    frozen = tuple(sorted(options.items()))
    if backend in ("exact", "flash"):
        seq_len = scales.token_layout(sides).seq_len
        cache = jnp.zeros((batch, seq_len, num_heads, head_dim), dtype)
        return DecodeState({"k": cache, "v": cache}, backend, sides, frozen)
    arrays = {}
    if backend == "favor":
        arrays["projection"] = favor.draw_projection(
            rng, options.get("num_features", 256), head_dim,
            orthogonal=options.get("orthogonal", True))
    fmap, _ = low_rank_map(backend, head_dim, frozen, arrays.get("projection"))
    arrays["sums"] = prefix.init_sums(batch, num_heads, fmap.num_features, head_dim)
    return DecodeState(arrays, backend, sides, frozen)


def decode_scale(state: DecodeState, q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, scale_index: int, *,
                 backend, **options):
    """Attention of scale ``scale_index`` against itself and the coarser scales already fed.

    Returns (out_BxlxHxD in q's dtype, new_state). ``backend`` and any ``options`` given must
    match the state's (they are fixed when the state is made).
    """
    if backend != state.backend:
        raise ValueError(f"backend {backend!r} does not match the decoding state's "
                         f"{state.backend!r}")
    for name, value in options.items():
        if dict(state.options).get(name, value) != value or name not in dict(state.options):
            raise ValueError(f"option {name}={value!r} differs from the decoding state's options "
                             f"{dict(state.options)}")
    _checks.check_scale_qkv(q_BxlxHxD, k_BxlxHxD, v_BxlxHxD, state.patch_nums, scale_index)
    layout = scales.token_layout(state.patch_nums)
    begin, end = layout.begin_ends[scale_index]
    opts = dict(state.options)
    if backend in ("exact", "flash"):
        cache_k = state.arrays["k"].at[:, begin:end].set(k_BxlxHxD.astype(state.arrays["k"].dtype))
        cache_v = state.arrays["v"].at[:, begin:end].set(v_BxlxHxD.astype(state.arrays["v"].dtype))
        if backend == "exact":
            out = exact.attend_prefix(q_BxlxHxD, cache_k[:, :end], cache_v[:, :end])
        else:
            out = flash.prefix_call(q_BxlxHxD, cache_k[:, :end].astype(q_BxlxHxD.dtype),
                                    cache_v[:, :end].astype(q_BxlxHxD.dtype),
                                    opts.get("implementation", "default"))
        new = DecodeState({"k": cache_k, "v": cache_v}, backend, state.patch_nums, state.options)
        return out.astype(q_BxlxHxD.dtype), new
    head_dim = q_BxlxHxD.shape[-1]
    fmap, chunk = low_rank_map(backend, head_dim, state.options, state.arrays.get("projection"))
    fmap = fmap._replace(precision=prefix.precision_for(q_BxlxHxD.dtype))
    sums = state.arrays["sums"]
    batch, num_heads = sums.c_BxH.shape
    if chunk is None:
        chunk = prefix.default_chunk(batch, num_heads, fmap.num_features)
    sums = prefix.absorb(fmap, sums, k_BxlxHxD, v_BxlxHxD, chunk)
    out = prefix.read(fmap, sums, q_BxlxHxD, chunk)
    arrays = dict(state.arrays, sums=sums)
    return out.astype(q_BxlxHxD.dtype), DecodeState(arrays, backend, state.patch_nums,
                                                    state.options)
