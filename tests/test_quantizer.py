"""quantizer: residual encoding, teacher forcing == sampling inputs, VQ loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import interp, quantizer, scales

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
B, C, V = 2, 8, 64


def _setup(patch_nums=PATCH_NUMS, seed=0):
    rng = np.random.default_rng(seed)
    side = patch_nums[-1]
    f = rng.normal(size=(B, side, side, C)).astype(np.float32)
    codebook = rng.normal(size=(V, C)).astype(np.float32)
    mix = (rng.normal(size=(4, C, C)) / np.sqrt(C)).astype(np.float32)
    index_map = scales.phi_index_map(len(patch_nums))

    def phi(k, h):  # a stand-in for the model's Phi: a per-scale channel mix, half residual
        return 0.5 * h + 0.5 * jnp.einsum("bhwc,cd->bhwd", h, mix[index_map[k]],
                                          precision=jax.lax.Precision.HIGHEST)

    return f, codebook, mix, index_map, phi


def _reference(f, codebook, mix, index_map, patch_nums):
    """float64 numpy transcription of the official encode / idxBl_to_var_input loops."""
    f = f.astype(np.float64)
    e = codebook.astype(np.float64)
    side = patch_nums[-1]
    phi = lambda k, h: 0.5 * h + 0.5 * h @ mix[index_map[k]].astype(np.float64)
    resize = lambda x, n, mode: np.einsum("hH,bHWc,wW->bhwc", interp.resize_matrix(
        x.shape[1], n, mode), x, interp.resize_matrix(x.shape[2], n, mode))
    f_rest, f_hat, indices = f.copy(), np.zeros_like(f), []
    for k, pn in enumerate(patch_nums):
        z = resize(f_rest, pn, "area").reshape(-1, C)
        idx = np.argmin(((z[:, None, :] - e[None]) ** 2).sum(-1), axis=1).reshape(B, pn, pn)
        h = phi(k, resize(e[idx], side, "bicubic"))
        f_hat += h
        f_rest -= h
        indices.append(idx)
    tf, acc = [], np.zeros_like(f)
    for k in range(len(patch_nums) - 1):
        acc += phi(k, resize(e[indices[k]], side, "bicubic"))
        tf.append(resize(acc, patch_nums[k + 1], "area").reshape(B, -1, C))
    return indices, f_hat, np.concatenate(tf, axis=1)


@pytest.fixture(scope="module")
def encoded():
    f, codebook, mix, index_map, phi = _setup()
    enc = jax.jit(lambda f, e: quantizer.encode(f, e, phi, PATCH_NUMS))
    indices, f_hat = enc(f, codebook)
    return f, codebook, mix, index_map, phi, indices, f_hat


@pytest.fixture(scope="module")
def teacher_forced(encoded):
    _, codebook, _, _, phi, indices, _ = encoded
    tf_fn = jax.jit(lambda idx, e: quantizer.teacher_forcing_inputs(idx, e, phi, PATCH_NUMS))
    return tf_fn(indices, codebook)


def test_nearest_code_is_brute_force_argmin():
    rng = np.random.default_rng(3)
    z, e = rng.normal(size=(50, 5)).astype(np.float32), rng.normal(size=(30, 5)).astype(np.float32)
    want = np.argmin(((z[:, None].astype(np.float64) - e[None]) ** 2).sum(-1), axis=1)
    got = quantizer.nearest_code(z, e)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_encode_and_teacher_forcing_match_float64_reference(encoded, teacher_forced):
    f, codebook, mix, index_map, phi, indices, f_hat = encoded
    ref_idx, ref_fhat, ref_tf = _reference(f, codebook, mix, index_map, PATCH_NUMS)
    for k, pn in enumerate(PATCH_NUMS):
        assert indices[k].shape == (B, pn, pn) and indices[k].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(indices[k]), ref_idx[k], err_msg=f"scale {k}")
    np.testing.assert_allclose(np.asarray(f_hat), ref_fhat, atol=1e-5)
    tf = teacher_forced
    seq_len = scales.token_layout(PATCH_NUMS).seq_len
    assert tf.shape == (B, seq_len - 1, C) and tf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(tf), ref_tf, atol=1e-5)


def test_teacher_forcing_equals_sampling_loop(encoded, teacher_forced):
    f, codebook, _, _, phi, indices, f_hat = encoded
    tf = teacher_forced

    def sample_loop(idx, e):  # what a sampler does, fed the ground-truth codes
        f_hat, inputs = None, []
        for k in range(len(PATCH_NUMS)):
            f_hat, x_next = quantizer.next_scale_input(k, f_hat, e[idx[k]], phi, PATCH_NUMS)
            if x_next is not None:
                inputs.append(x_next)
        return jnp.concatenate(inputs, axis=1), f_hat

    loop_inputs, loop_fhat = jax.jit(sample_loop)(indices, codebook)
    assert float(jnp.max(jnp.abs(loop_inputs - tf))) <= 1e-6
    # The sampler's final f_hat, the decoded f_hat and the encoder's f_hat agree.
    rebuilt = jax.jit(lambda idx, e: quantizer.indices_to_fhat(idx, e, phi, PATCH_NUMS))(
        indices, codebook)
    np.testing.assert_allclose(np.asarray(loop_fhat), np.asarray(rebuilt), atol=1e-6)
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(f_hat), atol=1e-5)


def test_index_formats_are_equivalent(encoded):
    _, codebook, _, _, phi, indices, _ = encoded
    # Every accepted format normalises to the same (B, pn, pn) maps.
    flat = [np.asarray(m).reshape(B, -1) for m in indices]
    one = np.concatenate(flat, axis=1).astype(np.int64)
    for form in (flat, one, quantizer.flatten_indices(indices, PATCH_NUMS)):
        maps = quantizer.as_index_maps(form, PATCH_NUMS, V)
        for got, want in zip(maps, indices, strict=True):
            assert got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quantize_loss_straight_through_and_gradients(encoded):
    f, codebook, mix, index_map, phi, indices, f_hat = encoded
    beta = 0.25
    probe = np.random.default_rng(5).normal(size=f.shape).astype(np.float32)

    def objective(f, e):
        q = quantizer.quantize(f, e, phi, PATCH_NUMS, beta=beta)
        return q.vq_loss + jnp.sum(q.f_hat * probe), q

    (_, out), (grad_f, grad_e) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1),
                                                            has_aux=True))(f, codebook)
    for k in range(len(PATCH_NUMS)):
        np.testing.assert_array_equal(np.asarray(out.indices[k]), np.asarray(indices[k]))
    np.testing.assert_allclose(np.asarray(out.f_hat), np.asarray(f_hat), atol=1e-5)
    # Per-scale loss = (1 + beta) * mse(f_hat_k, f), f_hat_k the running sum after scale k.
    _, ref_fhat, _ = _reference(f, codebook, mix, index_map, PATCH_NUMS)
    side = PATCH_NUMS[-1]
    e64 = codebook.astype(np.float64)
    acc, want = np.zeros_like(ref_fhat), []
    for k in range(len(PATCH_NUMS)):
        up = np.einsum("hH,bHWc,wW->bhwc", interp.resize_matrix(PATCH_NUMS[k], side, "bicubic"),
                       e64[np.asarray(indices[k])],
                       interp.resize_matrix(PATCH_NUMS[k], side, "bicubic"))
        acc = acc + 0.5 * up + 0.5 * up @ mix[index_map[k]].astype(np.float64)
        want.append((1 + beta) * np.mean((acc - f) ** 2))
    np.testing.assert_allclose(np.asarray(out.vq_loss_per_scale), want, rtol=1e-5)
    np.testing.assert_allclose(float(out.vq_loss), np.mean(want), rtol=1e-5)
    assert out.hits_KxV.shape == (len(PATCH_NUMS), V)
    np.testing.assert_array_equal(np.asarray(out.hits_KxV.sum(1)),
                                  [B * pn * pn for pn in PATCH_NUMS])

    # Straight-through: d f_hat / d f = identity; commitment: beta * mean_k 2 (f - f_hat_k) / N.
    acc, commit = np.zeros_like(ref_fhat), np.zeros_like(ref_fhat)
    for k in range(len(PATCH_NUMS)):
        up = np.einsum("hH,bHWc,wW->bhwc", interp.resize_matrix(PATCH_NUMS[k], side, "bicubic"),
                       e64[np.asarray(indices[k])],
                       interp.resize_matrix(PATCH_NUMS[k], side, "bicubic"))
        acc = acc + 0.5 * up + 0.5 * up @ mix[index_map[k]].astype(np.float64)
        commit += beta * 2 * (f - acc) / f.size / len(PATCH_NUMS)
    np.testing.assert_allclose(np.asarray(grad_f), probe + commit, atol=1e-5)
    used = np.asarray(out.hits_KxV.sum(0)) > 0
    assert np.abs(np.asarray(grad_e)[used]).sum(1).min() > 0
    np.testing.assert_array_equal(np.asarray(grad_e)[~used], 0.0)


def test_official_schedule_jits_with_static_patch_nums():
    patch_nums = scales.SCHEDULES["256"]
    f, codebook, _, _, phi = _setup(patch_nums, seed=1)
    indices, f_hat = jax.jit(lambda f, e: quantizer.encode(f, e, phi, patch_nums))(f, codebook)
    assert [m.shape[1] for m in indices] == list(patch_nums)
    # Residual quantisation: the running f_hat is closer to f than the 1x1 start.
    assert float(jnp.mean((f_hat - f) ** 2)) < float(jnp.mean(f ** 2))


def test_bad_inputs_name_what_was_expected(encoded):
    f, codebook, _, _, phi, indices, _ = encoded
    with pytest.raises(ValueError, match="must end at the latent side"):
        quantizer.encode(f, codebook, phi, (1, 2, 4))
    with pytest.raises(ValueError, match=r"\(B, h, w, C\)"):
        quantizer.encode(f[0], codebook, phi, PATCH_NUMS)
    with pytest.raises(ValueError, match="channels"):
        quantizer.encode(f[..., :3], codebook, phi, PATCH_NUMS)
    bad = [np.asarray(m) for m in indices]
    bad[3] = bad[3].copy()
    bad[3][0, 0, 0] = V
    with pytest.raises(ValueError, match=r"indices\[3\] must lie in \[0, 64\)"):
        quantizer.teacher_forcing_inputs(bad, codebook, phi, PATCH_NUMS)
    with pytest.raises(ValueError, match="one array per scale"):
        quantizer.indices_to_fhat(indices[:-1], codebook, phi, PATCH_NUMS)
    with pytest.raises(ValueError, match=r"\(B, 3, 3\) or \(B, 9\)"):
        quantizer.indices_to_fhat(indices[:2] + [indices[3]] + indices[3:], codebook, phi,
                                  PATCH_NUMS)
    with pytest.raises(ValueError, match="L=130"):
        quantizer.indices_to_fhat(np.zeros((B, 129), np.int32), codebook, phi, PATCH_NUMS)
    with pytest.raises(ValueError, match="scale_index"):
        quantizer.next_scale_input(6, None, jnp.zeros((B, 8, 8, C)), phi, PATCH_NUMS)
    with pytest.raises(ValueError, match=r"h must be \(B, 2, 2, C\)"):
        quantizer.next_scale_input(1, None, jnp.zeros((B, 3, 3, C)), phi, PATCH_NUMS)
