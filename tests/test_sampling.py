"""The jitted next-scale sampler: filters, CFG, reproducibility, consistency, editing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _random_models import random_model
from flax import nnx

from var_jax import sampling, xla_options
from var_jax.models.var import VAR, VARConfig
from var_jax.models.vqvae import VQVAE, VQVAEConfig

PATCH_NUMS = (1, 2, 3, 4)
VAR_CFG = VARConfig.tiny(width=32, patch_nums=PATCH_NUMS, vocab_size=32, cvae=8, num_classes=5,
                         drop_path_rate=0.0)
VAE_CFG = VQVAEConfig.tiny(image_size=16, patch_nums=PATCH_NUMS, vocab_size=32, z_channels=8,
                           use_attn=False, use_mid_attn=False)


@pytest.fixture(scope="module")
def models():
    var = random_model(lambda: VAR(VAR_CFG, rngs=nnx.Rngs(0)), 0)
    vae = random_model(lambda: VQVAE(VAE_CFG, rngs=nnx.Rngs(0)), 1)
    return var, vae, sampling.Sampler(var, vae)


def _reference_filter(logits, top_k, top_p):
    """The official sample_with_top_k_top_p_ filter in float64 numpy."""
    x = np.array(logits, np.float64)
    if top_k > 0:
        kth = np.sort(x, axis=-1)[..., -top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    if top_p > 0:
        order = np.argsort(x, axis=-1, kind="stable")
        srt = np.take_along_axis(x, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        remove = np.cumsum(p, -1) <= 1 - top_p
        remove[..., -1] = False
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, -1)
        x = np.where(mask, -np.inf, x)
    return x


@pytest.mark.parametrize("top_k,top_p", [(5, 0.0), (0, 0.7), (7, 0.9), (1, 0.0), (0, 0.0),
                                         (40, 0.5)])
def test_filter_matches_official_rule(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 40))) * 2.0
    if top_p == 0:  # ties at the top (top-p splits ties by sort order; here ties stay together)
        logits[0, 0, :6] = logits[0, 0, 0]
    got = sampling.filter_top_k_top_p(jnp.asarray(logits, jnp.float32), top_k,
                                      top_p if top_p > 0 else None)
    want = _reference_filter(logits.astype(np.float32), top_k, top_p)
    np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(want))
    kept = ~np.isinf(want)
    np.testing.assert_allclose(np.asarray(got)[kept], want[kept], rtol=1e-6)
    if top_k == 5:  # the six tied top values are all kept
        assert kept[0, 0, :6].all()


def test_filter_at_the_released_sizes():
    """V = 4096, top-k 900, top-p 0.96 (the released defaults) and a top-p tiny enough that
    only the largest token survives."""
    logits = np.asarray(jax.random.normal(jax.random.key(1), (6, 4096))) * 3.0
    for top_k, top_p in ((900, 0.96), (0, 1e-6), (4096, 0.5)):
        got = sampling.filter_top_k_top_p(jnp.asarray(logits, jnp.float32), top_k, top_p)
        want = _reference_filter(logits.astype(np.float32), top_k, top_p)
        np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(want))
    assert np.all(np.sum(~np.isinf(np.asarray(got)), -1) > 1)


def test_sample_categorical_draws_the_softmax_distribution():
    probs = np.array([0.1, 0.0, 0.3, 0.6, 0.0])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(40_000, 0)
    draws = np.asarray(jax.jit(sampling.sample_categorical)(jax.random.key(2), logits))
    freq = np.bincount(draws, minlength=5) / draws.size
    assert freq[1] == 0 and freq[4] == 0  # zero-mass (filtered) entries are never drawn
    # Within 5 standard errors of each probability.
    np.testing.assert_allclose(freq, probs, atol=5 * np.sqrt(0.25 / draws.size))


@pytest.mark.parametrize("vocab", [4096, 100, 7])
def test_categorical_from_uniform_inverts_the_float64_cdf(vocab):
    # The blocked CDF (triangular matmuls) against float64 cumsum, and the draw against
    # searchsorted on it: only a uniform within float32 rounding of a CDF step may differ.
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 3, (64, vocab)).astype(np.float32)
    logits[:, ::5] = -np.inf  # filtered entries: zero mass
    u = rng.uniform(size=64).astype(np.float32)
    probs64 = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs64 /= probs64.sum(-1, keepdims=True)
    cdf64 = np.cumsum(probs64, -1)
    got_cdf = np.asarray(sampling._cdf_blocked(jnp.asarray(probs64, jnp.float32)))
    np.testing.assert_allclose(got_cdf, cdf64, atol=2e-6)
    want = np.array([np.searchsorted(c, x * c[-1], side="left")
                     for c, x in zip(cdf64, u, strict=True)])
    got = np.asarray(jax.jit(sampling.categorical_from_uniform)(jnp.asarray(u),
                                                                jnp.asarray(logits)))
    gap = np.abs(cdf64[np.arange(64), np.minimum(want, vocab - 1)] - u * cdf64[:, -1])
    assert np.all((got == want) | (gap < 1e-5))
    assert not np.any(np.isinf(logits[np.arange(64), got]))


def test_filter_rejects_top_k_above_vocabulary():
    with pytest.raises(ValueError, match="top_k"):
        sampling.filter_top_k_top_p(jnp.zeros((2, 8)), 9)


@pytest.mark.parametrize("length,chunk", [(1, 16), (9, 16), (16, 16), (100, 16), (100, 64)])
def test_chunked_draw_is_the_draw_at_the_scales_own_shape(length, chunk):
    """Drawing a scale's tokens ``chunk`` at a time over padded tokens (the sampler on a CPU)
    gives the same tokens and filtered logits as drawing them all at the scale's shape."""
    k1, k2 = jax.random.split(jax.random.key(length + chunk))
    logits = 3.0 * jax.random.normal(k1, (4, length, 96))
    u = jax.random.uniform(k2, (2, length))
    draw = jax.jit(sampling.draw_scale_tokens,
                   static_argnames=("top_k", "chunk", "with_logits"))
    for top_k, top_p in [(0, 0.8), (20, None), (20, 0.9)]:
        want, want_logits = draw(logits, u, 1.5, top_k=top_k, top_p=top_p, with_logits=True)
        got, got_logits = draw(logits, u, 1.5, top_k=top_k, top_p=top_p, chunk=chunk,
                               with_logits=True)
        assert got.shape == (2, length) and got_logits.shape == (2, length, 96)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_logits, want_logits)
        assert draw(logits, u, 1.5, top_k=top_k, top_p=top_p, chunk=chunk)[1] is None
    # not a vacuous equality: another uniform changes some tokens
    base, _ = draw(logits, u, 1.5, top_k=0, top_p=0.8, chunk=chunk)
    other, _ = draw(logits, 1.0 - u, 1.5, top_k=0, top_p=0.8, chunk=chunk)
    assert length == 1 or not np.array_equal(other, base)


def test_cfg_mix():
    cond, uncond = jnp.full((2, 3, 4), 2.0), jnp.full((2, 3, 4), 0.5)
    mixed = sampling.cfg_mix(jnp.concatenate([cond, uncond]), 1.5)
    np.testing.assert_allclose(mixed, 2.5 * 2.0 - 1.5 * 0.5)


def test_bilinear_matrix_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((16, 16))
    for dst in (1, 3, 5, 13, 20):
        got = sampling.bilinear_matrix(16, dst) @ x @ sampling.bilinear_matrix(16, dst).T
        want = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(dst, dst),
                                               mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-12)


def test_keep_masks():
    mask = np.zeros((16, 16))
    mask[:, :8] = 1.0  # keep the left half
    masks = sampling.edit_keep_masks(mask, (1, 2, 4, 8), batch=2)
    assert [m.shape for m in masks] == [(2, 1), (2, 4), (2, 16), (2, 64)]
    assert bool(masks[0].all()) and not bool(masks[1].all())  # pn**2 <= 3: forced
    np.testing.assert_array_equal(np.asarray(masks[2][0]).reshape(4, 4),
                                  np.repeat([[1, 1, 0, 0]], 4, axis=0).astype(bool))
    with pytest.raises(ValueError, match="keep_mask"):
        sampling.edit_keep_masks(np.zeros((3, 16, 16)), (1, 2), batch=2)


def test_sampling_is_reproducible_and_shaped(models):
    _, _, sampler = models
    labels = jnp.array([0, 3, 5])
    maps_a, img_a = sampler(labels, jax.random.key(7), cfg=1.5, top_k=0, top_p=0.9)
    maps_b, img_b = sampler(labels, jax.random.key(7), cfg=1.5, top_k=0, top_p=0.9)
    maps_c, _ = sampler(labels, jax.random.key(8), cfg=1.5, top_k=0, top_p=0.9)
    assert [m.shape for m in maps_a] == [(3, p, p) for p in PATCH_NUMS]
    assert all(m.dtype == jnp.int32 for m in maps_a)
    assert img_a.shape == (3, 16, 16, 3)
    assert float(img_a.min()) >= 0.0 and float(img_a.max()) <= 1.0
    for a, b in zip(maps_a, maps_b, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img_a, img_b)
    assert any(not np.array_equal(a, c) for a, c in zip(maps_a, maps_c, strict=True))


@pytest.mark.parametrize("guidance_power", [1.0, 2.0, 0.0])
def test_greedy_tokens_are_argmax_of_guided_teacher_forcing(models, guidance_power):
    """The sampler's tokens, teacher-forced back through the model, are the CFG-mixed argmax,
    with the guidance cfg * (k / (K - 1)) ** guidance_power at scale k (1: the official ramp;
    0: the same guidance at every scale)."""
    var, vae, sampler = models
    labels = jnp.array([1, 4])
    cfg = 2.0
    maps, _ = sampler(labels, jax.random.key(0), cfg=cfg, top_k=1, top_p=0.0,
                      guidance_power=guidance_power)

    @nnx.jit
    def guided(var, vae, labels, maps):
        x = vae.teacher_forcing_inputs(maps)
        both = var(jnp.concatenate([labels, jnp.full_like(labels, VAR_CFG.num_classes)]),
                   jnp.concatenate([x, x]))
        return both

    both = np.asarray(guided(var, vae, labels, maps))
    begin = 0
    for k, pn in enumerate(PATCH_NUMS):
        t = cfg * (k / (len(PATCH_NUMS) - 1)) ** guidance_power
        mixed = (1 + t) * both[:2, begin:begin + pn * pn] - t * both[2:, begin:begin + pn * pn]
        np.testing.assert_array_equal(np.asarray(maps[k]).reshape(2, -1), mixed.argmax(-1))
        begin += pn * pn


def test_editing_keeps_reference_tokens(models):
    var, vae, _ = models
    labels = jnp.array([0, 1])
    ref = [jax.random.randint(jax.random.key(k), (2, p, p), 0, VAR_CFG.vocab_size)
           for k, p in enumerate(PATCH_NUMS)]
    mask = np.zeros((16, 16))
    mask[:, :8] = 1.0
    maps, images = sampling.edit(var, vae, labels, ref, mask, key=5, cfg=1.0, top_k=0,
                                 top_p=0.0, more_smooth=True)
    again = sampling.edit(var, vae, labels, ref, mask, key=5, cfg=1.0, top_k=0, top_p=0.0,
                          more_smooth=True)[1]
    np.testing.assert_array_equal(images, again)  # reproducible, Gumbel mixing included
    assert np.isfinite(np.asarray(images)).all()
    keep = sampling.edit_keep_masks(mask, PATCH_NUMS, 2)
    changed = 0
    for k, (got, want) in enumerate(zip(maps, ref, strict=True)):
        got, want, kk = (np.asarray(a).reshape(2, -1) for a in (got, want, keep[k]))
        np.testing.assert_array_equal(got[kk], want[kk])
        changed += int((got[~kk] != want[~kk]).sum())
    assert changed > 0  # outside the mask the model samples
    assert images.shape == (2, 16, 16, 3)


def test_the_sampler_decodes_with_its_own_compiled_decoder(models, monkeypatch):
    """The images are the decoder's on the sampled f_hat, also with the sampler inside a
    caller's jit; on a CPU the float32 decoder is compiled without XLA's YNNPACK fusions (none
    left in its program, some with the defaults), and an XLA that no longer knows that option
    falls back to the defaults."""
    var, vae, sampler = models
    labels = jnp.array([0, 4])
    token_maps, images = sampler(labels, 3, cfg=1.0, top_k=0, top_p=0.0)
    f_hat = vae.indices_to_fhat(token_maps)
    expected = (np.asarray(vae.decode_features(f_hat), np.float64) + 1) / 2
    np.testing.assert_allclose(np.asarray(images), expected, atol=1e-5)
    nested = jax.jit(lambda lab: sampler(lab, 3, cfg=1.0, top_k=0, top_p=0.0)[1])(labels)
    np.testing.assert_allclose(np.asarray(nested), expected, atol=1e-5)
    graphdef, state = nnx.split(vae)
    if jax.default_backend() == "cpu":
        def program(options):
            fn = sampling._compiled_decoder(graphdef, options)
            return fn.lower(state, f_hat).compile().as_text()
        assert "__ynn_fusion" in program(())
        assert "__ynn_fusion" not in program(xla_options.CPU_CONVOLUTIONS)
    monkeypatch.setattr(xla_options, "CPU_CONVOLUTIONS", (("xla_cpu_no_such_option", ""),))
    monkeypatch.setattr(xla_options, "_known", {"convolutions": True})
    again = sampling.decode_images(graphdef, state, f_hat)
    np.testing.assert_allclose(np.asarray(again), expected, atol=1e-5)
    if jax.default_backend() == "cpu":
        assert xla_options._known == {"convolutions": False}


@pytest.mark.parametrize("backend", ["exact", "flash"])
def test_scales_in_buckets_draw_the_same_tokens(backend):
    """The sampler with its scales in buckets (one compiled step per bucket, the scales padded
    to its largest map at traced offsets) draws the tokens of the scale-by-scale sampler, with
    the filters, the guidance ramp, Gumbel mixing and editing, and decodes the same images."""
    patch_nums = (1, 2, 3, 4, 6)  # buckets (1x1 ... 3x3 padded to 3x3), (4x4), (6x6)
    var = random_model(lambda: VAR(VARConfig.tiny(
        width=32, patch_nums=patch_nums, vocab_size=32, cvae=8, num_classes=5,
        drop_path_rate=0.0, attn_backend=backend), rngs=nnx.Rngs(0)), 0)
    vae = random_model(lambda: VQVAE(VQVAEConfig.tiny(
        image_size=24, patch_nums=patch_nums, vocab_size=32, z_channels=8, use_attn=False,
        use_mid_attn=False), rngs=nnx.Rngs(0)), 1)
    per_scale = sampling.Sampler(var, vae)
    bucketed = sampling.Sampler(var, vae, scale_buckets=True)
    assert per_scale.buckets is None
    assert [b.scales for b in bucketed.buckets] == [(0, 1, 2), (3,), (4,)]
    labels = jnp.array([0, 3, 5])
    ref = [jax.random.randint(jax.random.key(k), (3, p, p), 0, 32)
           for k, p in enumerate(patch_nums)]
    keep = sampling.edit_keep_masks(np.tril(np.ones((24, 24))), patch_nums, 3)
    settings = [dict(cfg=1.5, top_k=8, top_p=0.9, guidance_power=2.0),
                dict(cfg=2.0, top_k=0, top_p=0.0, more_smooth=True, reference_maps=ref,
                     keep_masks=keep)]
    for options in settings[:1] if backend == "flash" else settings:
        maps_a, images_a = per_scale(labels, 7, **options)
        maps_b, images_b = bucketed(labels, 7, **options)
        for a, b in zip(maps_a, maps_b, strict=True):
            np.testing.assert_array_equal(b, a)
        np.testing.assert_allclose(images_b, images_a, atol=2e-5)
    assert len({int(t) for m in maps_b[1:] for t in np.ravel(m)}) > 1


def test_bad_arguments(models):
    _, _, sampler = models
    with pytest.raises(ValueError, match="labels_B"):
        sampler(jnp.array([0, 6]), 0, top_k=0)
    with pytest.raises(ValueError, match="labels_B"):
        sampler(jnp.array([-1]), 0, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        sampler(jnp.array([0]), 0, top_k=VAR_CFG.vocab_size + 1)
    with pytest.raises(ValueError, match="top_p"):
        sampler(jnp.array([0]), 0, top_k=0, top_p=1.5)
    with pytest.raises(ValueError, match="key"):
        sampler(jnp.array([0]), "seed", top_k=0)
    with pytest.raises(ValueError, match="guidance_power must be a finite number >= 0"):
        sampler(jnp.array([0]), 0, top_k=0, guidance_power=-1.0)
    with pytest.raises(ValueError, match="scale_buckets must be True or False"):
        sampling.Sampler(models[0], models[1], scale_buckets="yes")
    low_rank = nnx.eval_shape(lambda: VAR(VARConfig.tiny(
        width=32, patch_nums=PATCH_NUMS, vocab_size=32, cvae=8, num_classes=5,
        attn_backend="poly", attn_options={"degree": 2}), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="KV-cache attention backend"):
        sampling.Sampler(low_rank, models[1], scale_buckets=True)
    other = VARConfig.tiny(width=32, patch_nums=(1, 2), vocab_size=32, cvae=8)
    var = nnx.eval_shape(lambda: VAR(other, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="patch_nums"):
        sampling.Sampler(var, models[1])
