"""VQ-VAE: parity with the official PyTorch model, parameter count, conversion, training forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import quantizer
from var_jax.convert import common
from var_jax.convert.vqvae import (
    load_vqvae_state_dict,
    vqvae_config_from_state_dict,
    vqvae_from_state_dict,
    vqvae_rules,
    vqvae_state_dict,
)
from var_jax.models import vqvae


def test_released_parameter_count():
    assert vqvae.count_params(vqvae.VQVAEConfig.released()) == 108_948_355


@pytest.fixture(scope="module")
def official(official_int8):
    """The ch=32 official VQ-VAE loaded from .npz, run once (jitted) on the reference images."""
    cfg = vqvae.VQVAEConfig.released(ch=32)
    assert vqvae_config_from_state_dict(official_int8.npz("vae")) == cfg
    model = vqvae_from_state_dict(cfg, official_int8.npz("vae"))
    vectors = official_int8.vectors

    @nnx.jit
    def run(model, images):
        f = model.encode_features(images)
        indices, f_hat = model.features_to_indices(f)
        return indices, f_hat, model.teacher_forcing_inputs(indices), model.decode_features(f_hat)

    indices, f_hat, tf, decoded = run(model, jnp.asarray(vectors["image_NHWC"]))
    return model, vectors, indices, f_hat, tf, decoded


def test_official_indices_identical(official):
    _, vectors, indices, *_ = official
    for k, pn in enumerate(vectors["patch_nums"]):
        got = np.asarray(indices[k]).reshape(2, pn * pn)
        np.testing.assert_array_equal(got, vectors[f"indices_scale{k}"], err_msg=f"scale {k}")


def test_official_teacher_forcing_and_decode(official):
    model, vectors, indices, f_hat, tf, decoded = official
    want_tf = vectors["teacher_forcing_inputs_BxLm1xC"]
    assert tf.shape == want_tf.shape == (2, 679, 32)
    np.testing.assert_allclose(np.asarray(tf), want_tf, atol=1e-5 * max(1, np.abs(want_tf).max()))
    # The decoder gets the encoder's f_hat; the official one rebuilds it from the indices.
    np.testing.assert_allclose(np.asarray(decoded), vectors["decoded_NHWC"], atol=2e-5)
    rebuilt = nnx.jit(lambda m, idx: m.indices_to_fhat(idx))(model, indices)
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(f_hat), atol=1e-5)


@pytest.mark.torch
def test_official_pth_loads_through_torch(official_int8, official):
    model = official[0]
    from_pth = common.load_state_dict_file(official_int8.pth("vae"))
    from_npz = common.load_state_dict_file(official_int8.npz("vae"))
    assert from_pth.keys() == from_npz.keys()
    other = vqvae_from_state_dict(model.config, official_int8.pth("vae"))
    mine, theirs = nnx.state(model, nnx.Param), nnx.state(other, nnx.Param)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Export is the inverse of loading (the usage buffer is not a parameter).
    exported = vqvae_state_dict(model)
    assert set(exported) == set(from_npz) - {"quantize.ema_vocab_hit_SV"}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, from_npz[name], err_msg=name)


@pytest.mark.torch
def test_group_norm_and_attention_match_torch():
    torch = pytest.importorskip("torch")
    cfg = vqvae.VQVAEConfig.tiny()
    rng = np.random.default_rng(0)
    attn = vqvae.AttnBlock(64, cfg, rngs=nnx.Rngs(2))
    t_norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    # Tiny variance: eps = 1e-6 and the biased variance both show at this scale.
    small = (rng.normal(size=(2, 4, 4, 64)) * 2e-3).astype(np.float32)
    with torch.no_grad():
        want = t_norm(torch.from_numpy(small).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(attn.norm(small)), want, atol=2e-5)
    # A large mean: the two-pass variance (use_fast_variance=False) stays exact; torch's CPU
    # kernel itself is off by ~1e-3 here, so compare with float64.
    offset = (rng.normal(size=(2, 4, 4, 64)) * 0.5 + 30.0).astype(np.float64)
    grouped = offset.reshape(2, 16, 32, 2)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    want64 = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(offset.shape)
    np.testing.assert_allclose(np.asarray(attn.norm(offset.astype(np.float32))), want64,
                               atol=5e-5)

    x = rng.normal(size=(2, 4, 4, 64)).astype(np.float32)
    t_qkv, t_proj = torch.nn.Conv2d(64, 192, 1), torch.nn.Conv2d(64, 64, 1)
    with torch.no_grad():
        for tmod, param_from in ((t_qkv, attn.qkv), (t_proj, attn.proj_out)):
            kernel = np.array(param_from.kernel[...])
            tmod.weight.copy_(torch.from_numpy(np.ascontiguousarray(common.flax_to_conv(kernel))))
            tmod.bias.copy_(torch.from_numpy(np.array(param_from.bias[...])))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        q, k, v = t_qkv(t_norm(xt)).reshape(2, 3, 64, 16).unbind(1)
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 64 ** -0.5, dim=2)
        want = xt + t_proj(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 64, 4, 4))
    np.testing.assert_allclose(np.asarray(attn(x)), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _nearest_up2_conv3x3_float64(x, kernel, bias):
    """The official Upsample written out: repeat each pixel 2x2, zero-pad by one, 3x3 conv."""
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = up.shape[1:3]
    out = np.zeros(up.shape[:3] + (kernel.shape[-1],))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
    return out + bias


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 3), (1, 4, 4, 8)])
def test_upsample_at_low_resolution_is_the_official_upsample(shape):
    """The folded 2x2 phases compute nearest x2 + 3x3 conv: values (float64) and gradients."""
    rng = np.random.default_rng(sum(shape))
    cin, cout = shape[-1], shape[-1] + 2
    x = rng.normal(size=shape)
    kernel, bias = rng.normal(size=(3, 3, cin, cout)), rng.normal(size=cout)
    want = _nearest_up2_conv3x3_float64(x, kernel, bias)
    got = vqvae.nearest_up2_conv3x3(*(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)),
                                    precision="highest")
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)

    def direct(x, kernel, bias):  # the module as it was: upsampled copy, then the 3x3 conv
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(
            up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest") + bias

    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    args = tuple(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(*args)
             for f in (lambda *a: vqvae.nearest_up2_conv3x3(*a, precision="highest"), direct)]
    for got_grad, want_grad in zip(*grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


def _random_state_dict(config, seed=0):
    """Official-layout random weights (fan-in scaled), built without compiling initialisers."""
    abstract = nnx.eval_shape(lambda: vqvae.VQVAE(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    out = {}
    for rule in vqvae_rules(abstract):
        shape = common.get_at_path(abstract, rule.path).shape
        if rule.path[-1] == "scale":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif len(shape) == 1:
            value = 0.1 * rng.normal(size=shape)
        else:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        out[rule.torch_key] = rule.to_torch(value.astype(np.float32))
    return out


@pytest.fixture(scope="module")
def tiny():
    config = vqvae.VQVAEConfig.tiny()
    return vqvae_from_state_dict(config, _random_state_dict(config))


def test_conversion_refuses_bad_state_dicts(tiny):
    good = vqvae_state_dict(tiny)
    load_vqvae_state_dict(tiny, good)  # round trip accepted
    missing = dict(good)
    del missing["decoder.up.1.block.0.nin_shortcut.bias"]
    with pytest.raises(ValueError, match=r"missing keys: 'decoder\.up\.1\.block\.0\.nin_shortcut"
                                         r"\.bias'"):
        load_vqvae_state_dict(tiny, missing)
    extra = dict(good, **{"encoder.down.9.block.0.conv1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: 'encoder\.down\.9\.block\.0\.conv1"):
        load_vqvae_state_dict(tiny, extra)
    wrong = dict(good, **{"quant_conv.weight": np.zeros((16, 16, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"wrong shape for 'quant_conv\.weight': got "
                                         r"\(16, 16, 1, 1\), the model needs \(16, 16, 3, 3\)"):
        load_vqvae_state_dict(tiny, wrong)
    # The usage buffer is ignored, not required.
    load_vqvae_state_dict(tiny, dict(good, **{"quantize.ema_vocab_hit_SV": np.zeros((6, 256))}))


def test_checkpoint_file_errors(tmp_path, tiny):
    path = tmp_path / "vae.npz"
    np.savez(path, **vqvae_state_dict(tiny))
    other = vqvae_from_state_dict(tiny.config, path)
    np.testing.assert_array_equal(np.asarray(other.codebook), np.asarray(tiny.codebook))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        common.load_state_dict_file(truncated)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        common.load_state_dict_file(tmp_path.joinpath("x.txt").write_text("x") and
                                    tmp_path / "x.txt")
    with pytest.raises(ValueError, match="not found"):
        common.load_state_dict_file(tmp_path / "absent.pth")


def test_training_forward_is_differentiable(tiny):
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

    def loss_fn(model):
        out = model(images)
        recon = jnp.mean(jnp.abs(out.reconstruction - images)) + jnp.mean(
            (out.reconstruction - images) ** 2)
        return recon + out.vq_loss, out

    (loss, out), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(tiny)
    assert np.isfinite(float(loss))
    assert out.reconstruction.shape == images.shape
    assert [m.shape[1] for m in out.indices] == list(tiny.config.patch_nums)
    assert out.hits_KxV.shape == (6, 256)
    np.testing.assert_array_equal(np.asarray(out.hits_KxV.sum(1)),
                                  [2 * p * p for p in (1, 2, 3, 4, 6, 8)])
    np.testing.assert_array_equal(
        np.asarray(quantizer.index_hits(out.indices, 256, tiny.config.patch_nums)),
        np.asarray(out.hits_KxV))
    # Gradient reaches every part: encoder (straight-through), decoder, codebook and Phi.
    for part in (grads.encoder.conv_in.kernel, grads.decoder.conv_out.kernel,
                 grads.quantize.embedding, grads.quantize.quant_resi.qresi_ls[3].kernel,
                 grads.quant_conv.kernel):
        assert float(jnp.abs(part[...]).sum()) > 0
    # The codebook is a plain Param that can be overwritten (dead-code re-seeding).
    new = jnp.zeros_like(tiny.codebook)
    old = tiny.codebook
    tiny.quantize.embedding[...] = new
    assert float(jnp.abs(tiny.codebook).sum()) == 0
    tiny.quantize.embedding[...] = old


def test_bad_images_and_configs(tiny):
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
        tiny.encode_features(jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4, got 30x30"):
        tiny.encode_features(jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match="images must be 32x32"):
        tiny.encode_features(jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        tiny.encode_features(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.indices_to_images([np.full((1, p, p), 256) for p in (1, 2, 3, 4, 6, 8)])
    with pytest.raises(ValueError, match="must end at the latent side 8"):
        vqvae.VQVAEConfig.tiny(patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor"):
        vqvae.VQVAEConfig.tiny(image_size=30)
    with pytest.raises(ValueError, match="norm_groups"):
        vqvae.VQVAEConfig.tiny(ch=24)
    with pytest.raises(ValueError, match="features must be"):
        tiny.decode_features(jnp.zeros((1, 4, 4, 16)))


@pytest.mark.torch
def test_truncated_or_foreign_pth_is_refused(tmp_path, official_int8):
    torch = pytest.importorskip("torch")
    truncated = tmp_path / "vae.pth"
    truncated.write_bytes(official_int8.pth("vae").read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated"):
        common.load_state_dict_file(truncated)
    foreign = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], foreign)
    with pytest.raises(ValueError, match="expected a state_dict"):
        common.load_state_dict_file(foreign)
