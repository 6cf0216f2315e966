"""Invariants every backend must keep: block-causality, incremental == full, jit == eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_helpers import ALL, LAYOUT, OPTIONS, PATCH_NUMS, B, D, H, qkv

from var_jax import attention


def _attend(backend, **extra):
    def run(q, k, v, rng):
        return attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend, rng=rng,
                                                **OPTIONS[backend], **extra)
    return run


# favor in chunks of 4 tokens: the scanned, rematerialised path with the running stabiliser.
@pytest.mark.parametrize("backend,extra", [(b, {}) for b in ALL] + [
    ("favor", {"chunk": 4, "group_tokens": 0})])
def test_block_causality_by_gradients(backend, extra):
    q, k, v = qkv(seed=9, temperature=2.0)
    weights = jax.random.normal(jax.random.key(10), q.shape)
    positions = jnp.asarray(LAYOUT.level_ids)[None, :, None, None]

    @jax.jit
    def grads_per_scale(q, k, v, rng):
        _, vjp = jax.vjp(lambda q, k, v: _attend(backend, **extra)(q, k, v, rng), q, k, v)
        return [vjp(jnp.where(positions == s, weights, 0.0)) for s in range(len(PATCH_NUMS))]

    all_grads = grads_per_scale(q, k, v, jax.random.key(1))
    for scale, grads in enumerate(all_grads):
        begin, end = LAYOUT.begin_ends[scale]
        for g in grads:
            g = np.asarray(g)
            assert np.all(np.isfinite(g))
            assert np.all(g[:, end:] == 0), (backend, scale)  # exactly zero, not small
        assert np.abs(np.asarray(grads[2])[:, begin:end]).max() > 0
        if scale > 0:  # coarser keys do influence this scale
            assert np.abs(np.asarray(grads[1])[:, :begin]).max() > 0


@pytest.mark.parametrize("backend", ALL)
def test_incremental_equals_full_and_jit_equals_eager(backend):
    q, k, v = qkv(seed=11, temperature=3.0)
    rng = jax.random.key(1)
    full = jax.jit(_attend(backend))(q, k, v, rng)
    eager = _attend(backend)(q, k, v, rng)
    np.testing.assert_allclose(eager, full, atol=2e-6, rtol=1e-5)

    @jax.jit
    def decode_all(q, k, v, rng):
        state = attention.init_decode_state(backend, B, H, D, PATCH_NUMS, rng=rng,
                                            **OPTIONS[backend])
        outs = []
        for scale, (begin, end) in enumerate(LAYOUT.begin_ends):
            sl = slice(begin, end)
            out, state = attention.decode_scale(state, q[:, sl], k[:, sl], v[:, sl], scale,
                                                backend=backend)
            outs.append(out)
        return jnp.concatenate(outs, 1), state

    if backend in ("poly", "favor"):  # the other code paths of the full call
        for variant in ({"group_tokens": 0}, {"group_tokens": 14}, {"chunk": 4}):
            opts = dict(OPTIONS[backend], **variant)
            other = attention.block_causal_attention(q, k, v, PATCH_NUMS, backend=backend,
                                                     rng=rng, **opts)
            np.testing.assert_allclose(other, full, atol=2e-6, rtol=1e-5, err_msg=str(variant))
    inc, state = decode_all(q, k, v, rng)
    np.testing.assert_allclose(inc, full, atol=2e-6, rtol=1e-5)
    if backend in ("poly", "favor"):  # O(M x D) per head, independent of L
        s = state.arrays["sums"].s_BxHxMxD
        assert s.shape[:2] == (B, H) and s.shape[-1] == D
    else:
        assert state.arrays["k"].shape == (B, LAYOUT.seq_len, H, D)
    # The state crosses a jit boundary as a pytree (one step, jitted on its own).
    state0 = attention.init_decode_state(backend, B, H, D, PATCH_NUMS, rng=rng,
                                         **OPTIONS[backend])
    step = jax.jit(attention.decode_scale, static_argnames=("scale_index", "backend"))
    out0, state1 = step(state0, q[:, :1], k[:, :1], v[:, :1], scale_index=0, backend=backend)
    np.testing.assert_allclose(out0, full[:, :1], atol=2e-6, rtol=1e-5)
    assert jax.tree.structure(state1) == jax.tree.structure(state0)


@pytest.mark.parametrize("backend", ["exact", "flash"])
def test_padded_rows_at_traced_offsets_decode_like_each_scale(backend):
    """``decode_rows`` (what the bucketed sampler runs): every scale padded to the finest
    scale's rows with garbage in the padding, written at a traced offset, attending to the
    whole cache with the keys from the scale's end masked, gives each scale's outputs of the
    full call on its own rows; the padding never leaks into a later scale."""
    q, k, v = qkv(seed=12, temperature=3.0)
    full = _attend(backend)(q, k, v, None)
    rows = PATCH_NUMS[-1] ** 2
    garbage = jax.random.normal(jax.random.key(3), (3, B, rows, H, D)) * 5.0

    @jax.jit
    def one_scale(state, q, k, v, begin, end):
        return attention.decode_rows(state, q, k, v, begin, end, backend=backend)

    state = attention.init_decode_state(backend, B, H, D, PATCH_NUMS, **OPTIONS[backend])
    state = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, rows), (0, 0), (0, 0))), state)
    for begin, end in LAYOUT.begin_ends:
        padded = [jnp.concatenate([x[:, begin:end], g[:, end - begin:]], axis=1)
                  for x, g in zip((q, k, v), garbage, strict=True)]
        out, state = one_scale(state, *padded, jnp.int32(begin), jnp.int32(end))
        np.testing.assert_allclose(out[:, :end - begin], full[:, begin:end], atol=2e-6,
                                   rtol=1e-5, err_msg=f"{backend} [{begin}, {end})")
    with pytest.raises(ValueError, match="padded-rows step"):
        low_rank = attention.init_decode_state("poly", B, H, D, PATCH_NUMS, **OPTIONS["poly"])
        attention.decode_rows(low_rank, q[:, :1], k[:, :1], v[:, :1], 0, 1, backend="poly")
