"""Official checkpoints: strict conversion, parity with the official outputs, the pipeline."""

import numpy as np
import pytest

from var_jax import pretrained
from var_jax.convert import common
from var_jax.convert import var as var_convert
from var_jax.models.var import VARConfig


@pytest.fixture(scope="module")
def official(official_int8):
    """The depth-2 official VAR + ch=32 VQ-VAE, loaded once for the module from .npz files
    (no torch)."""
    pipe = pretrained.load_official(official_int8.npz("vae"), official_int8.npz("var"))
    return pipe, official_int8.vectors, official_int8.index_maps


@pytest.fixture(scope="module")
def var_sd(official_int8):
    return common.load_state_dict_file(official_int8.npz("var"))


def test_inferred_architectures(official):
    pipe, vectors, _ = official
    cfg = pipe.var.config
    assert (cfg.depth, cfg.width, cfg.num_heads, cfg.shared_aln) == (2, 128, 2, False)
    assert cfg.patch_nums == tuple(vectors["patch_nums"].tolist())
    assert (cfg.vocab_size, cfg.cvae, cfg.num_classes) == (4096, 32, 1000)
    vae = pipe.vqvae.config
    assert (vae.ch, vae.ch_mult, vae.num_res_blocks, vae.image_size) == (32, (1, 1, 2, 2, 4), 2,
                                                                         256)


def test_encode_matches_official(official):
    pipe, vectors, maps = official
    got = pipe.encode(vectors["image_NHWC"])
    for k, (g, want) in enumerate(zip(got, maps, strict=True)):
        pn = pipe.patch_nums[k]
        assert g.dtype == np.int32 and g.shape == (2, pn, pn)
        np.testing.assert_array_equal(np.asarray(g).reshape(2, -1), want, err_msg=f"scale {k}")


def test_decode_matches_official(official):
    pipe, vectors, maps = official
    np.testing.assert_allclose(pipe.decode(maps), vectors["decoded_NHWC"], atol=2e-5)


def test_teacher_forced_logits_match_official(official):
    pipe, vectors, maps = official
    x = pipe.vqvae.teacher_forcing_inputs(maps)
    np.testing.assert_allclose(x, vectors["teacher_forcing_inputs_BxLm1xC"], atol=1e-5)
    logits = np.asarray(pipe.logits(vectors["labels"], maps))
    assert logits.shape == (2, 680, 4096) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[..., :64], vectors["logits_first64_BxLx64"], atol=1e-5,
                               rtol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(lse, vectors["logsumexp_BxL"], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(logits.argmax(-1), vectors["argmax_BxL"])


def test_greedy_samples_match_official(official):
    pipe, vectors, _ = official
    images = np.asarray(pipe.sample(vectors["greedy_labels"], seed=0, cfg=1.5, top_k=1,
                                    top_p=0.0))
    want = vectors["greedy_images_NHWC_0to1"]
    assert images.shape == want.shape
    # Identical up to rare argmax flips (which would change whole patches).
    close = np.abs(images - want) <= 1e-5
    assert close.mean() > 0.99, f"max diff {np.abs(images - want).max()}"


def test_pth_and_npz_give_the_same_parameters(official_int8, var_sd):
    from_pth = common.load_state_dict_file(official_int8.pth("var"))
    assert set(from_pth) == set(var_sd)
    for key, value in var_sd.items():
        np.testing.assert_array_equal(from_pth[key], value, err_msg=key)


def test_export_round_trip(official, var_sd):
    pipe, _, _ = official
    exported = var_convert.var_state_dict(pipe.var)
    assert set(exported) == set(var_sd)
    for key, value in var_sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _model_for(var_sd, **overrides):
    from flax import nnx

    from var_jax.models.var import VAR
    cfg = var_convert.infer_config(var_sd, **overrides)
    return nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0))), cfg


def test_conversion_refuses_bad_state_dicts(var_sd):
    model, cfg = _model_for(var_sd)
    missing = dict(var_sd)
    del missing["blocks.1.attn.q_bias"]
    with pytest.raises(ValueError, match=r"missing keys: 'blocks\.1\.attn\.q_bias'"):
        var_convert.check_state_dict(cfg, missing)
    extra = dict(var_sd, **{"blocks.0.attn.k_bias": np.zeros(128, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: 'blocks\.0\.attn\.k_bias'"):
        var_convert.check_state_dict(cfg, extra)
    wrong = dict(var_sd, **{"head.bias": np.zeros(4095, np.float32)})
    with pytest.raises(ValueError, match=r"'head\.bias' has shape \(4095,\), expected \(4096,\)"):
        var_convert.check_state_dict(cfg, wrong)
    # A transposed matrix has the right size but the wrong layout: refused, not reshaped.
    transposed = dict(var_sd)
    transposed["blocks.0.attn.mat_qkv.weight"] = var_sd["blocks.0.attn.mat_qkv.weight"].T
    with pytest.raises(ValueError, match=r"mat_qkv\.weight' has shape \(128, 384\)"):
        var_convert.load_var_state_dict(model, transposed)


def test_checkpoint_of_another_architecture_is_refused(var_sd, official_int8):
    for expected, field in ((VARConfig.official(3, vocab_size=4096), "depth"),
                            (VARConfig(depth=2, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
                             "schedule")):
        with pytest.raises(ValueError, match=field):
            var_convert.check_config(expected, var_sd)
    with pytest.raises(ValueError, match="depth"):
        pretrained.load_official(official_int8.npz("vae"), var_sd,
                                 var_config=VARConfig.official(16))
    deeper, _ = _model_for(var_sd, depth=3)
    with pytest.raises(ValueError, match=r"missing keys: 'blocks\.2\."):
        var_convert.load_var_state_dict(deeper, var_sd)


def test_unreadable_files_are_refused(tmp_path, official_int8):
    truncated = tmp_path / "var.npz"
    truncated.write_bytes((official_int8.npz("var")).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="var.npz"):
        pretrained.load_official(official_int8.npz("vae"), truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        pretrained.load_official(official_int8.npz("vae"), text)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(official_int8.pth("var").read_bytes()[:200_000])
    with pytest.raises(ValueError, match="cut.pth"):
        pretrained.load_official(official_int8.npz("vae"), cut)
    # A VQ-VAE file where the VAR belongs: no blocks.
    with pytest.raises(ValueError, match="blocks"):
        pretrained.load_official(official_int8.npz("vae"),
                                 official_int8.npz("vae"))


def test_bad_pipeline_inputs(official):
    pipe, vectors, maps = official
    with pytest.raises(ValueError, match="labels_B"):
        pipe.logits(np.array([3, 1001]), maps)
    with pytest.raises(ValueError, match="top_k"):
        pipe.sample(np.array([1]), seed=0, top_k=5000)


def test_converted_directory_loads_without_torch(official, tmp_path):
    pipe, _, _ = official
    path = pipe.save(tmp_path / "converted")
    again = pretrained.load_converted(path)
    assert again.var.config == pipe.var.config and again.vqvae.config == pipe.vqvae.config
    a = var_convert.var_state_dict(pipe.var)
    b = var_convert.var_state_dict(again.var)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    codebook = np.asarray(again.vqvae.codebook)
    np.testing.assert_array_equal(codebook, np.asarray(pipe.vqvae.codebook))
    (path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="format"):
        pretrained.load_converted(path)
