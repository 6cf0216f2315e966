"""The VQ-VAE decoder's attention through the attention registry (full, unmasked attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import attention
from var_jax.models.vqvae import VQVAE, VQVAEConfig


def _reference(q, k, v):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(n=37, d=8, bound=0.5, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (2, n, 2, d))
    k = jax.random.normal(kk, (2, n, 2, d))
    q = bound * q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return q, k, jax.random.normal(kv, (2, n, 2, d))


@pytest.mark.parametrize("backend,options,tol", [
    ("exact", {}, 1e-5), ("flash", {}, 1e-5), ("poly", {"degree": 8}, 1e-5),
    ("poly", {"degree": 2}, 2e-2), ("favor", {"num_features": 512}, 0.15),
    ("auto", {"logit_bound": 0.5}, 2 / 37)])
def test_full_attention_against_float64(backend, options, tol):
    q, k, v = _qkv()  # N = 37 tokens: no square map or schedule needed
    out = attention.full_attention(q, k, v, backend=backend, rng=jax.random.key(1), **options)
    ref = _reference(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(v).max() < tol


def test_full_attention_checks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not understood"):
        attention.full_attention(q, k, v, backend="exact", degree=2)
    with pytest.raises(ValueError, match="q, k, v"):
        attention.full_attention(q, k[:, :-1], v)


def _decode(cfg, z):
    model = VQVAE(cfg, rngs=nnx.Rngs(0))  # same seed: same parameters whatever the backend
    return np.asarray(model.decoder(z))


def test_decoder_backends():
    base = VQVAEConfig.tiny()
    z = jax.random.normal(jax.random.key(3), (1, 8, 8, base.z_channels))
    ref = _decode(base, z)
    flash = _decode(base.replace(decoder_attn_backend="flash"), z)
    np.testing.assert_allclose(flash, ref, atol=1e-4, rtol=1e-4)
    poly = _decode(base.replace(decoder_attn_backend="poly",
                                decoder_attn_options={"degree": 2}), z)
    assert np.all(np.isfinite(poly)) and np.abs(poly - ref).max() < 0.5 * np.abs(ref).max()
    # The encoder is untouched: the option is the decoder's only.
    model = VQVAE(base.replace(decoder_attn_backend="poly"), rngs=nnx.Rngs(0))
    assert model.encoder.mid.attn_1.backend is None
    assert model.decoder.mid.attn_1.backend[0] == "poly"


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="decoder_attn_backend"):
        VQVAEConfig.tiny(decoder_attn_backend="linear")
    with pytest.raises(ValueError, match="num_features"):
        VQVAEConfig.tiny(decoder_attn_backend="favor", decoder_attn_options={"num_features": 0})
    cfg = VQVAEConfig.tiny(decoder_attn_backend="favor",
                           decoder_attn_options=[["num_features", 64]])
    assert cfg.decoder_attn_options == (("num_features", 64),)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
