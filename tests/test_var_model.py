"""The VAR transformer: sizes, initialisation, block-causality, backends, training hooks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _random_models import random_model
from flax import nnx

from var_jax import scales
from var_jax.convert import var as var_convert
from var_jax.models import var as var_lib
from var_jax.models.var import VAR, VARConfig

# A model small enough to differentiate through on a CPU in seconds.
SMALL = VARConfig.tiny(width=32, patch_nums=(1, 2, 3), vocab_size=16, cvae=4, num_classes=5,
                       drop_path_rate=0.0)


def _inputs(config, batch=2, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (batch, config.seq_len - 1, config.cvae))
    labels = jnp.arange(batch) % (config.num_classes + 1)
    return labels, x


@nnx.jit
def _forward(model, labels, x):
    return model(labels, x)


@nnx.jit
def _train_forward(model, labels, x, key):
    return model(labels, x, deterministic=False, rngs=key)


def _perturbed(config, seed=0):
    return random_model(lambda: VAR(config, rngs=nnx.Rngs(0)), seed)


@pytest.mark.parametrize("depth,shared,expected", [
    (16, False, 310_283_520), (20, False, 600_917_136), (24, False, 1_033_399_360),
    (30, False, 2_010_020_356), (36, True, 2_353_893_904)])
def test_official_parameter_counts(depth, shared, expected):
    assert var_lib.count_params(VARConfig.official(depth, shared_aln=shared)) == expected


def test_official_size_rule():
    cfg = VARConfig.official(20)
    assert (cfg.width, cfg.num_heads, cfg.head_dim) == (1280, 20, 64)
    assert math.isclose(cfg.drop_path_rate, 0.1 * 20 / 24)
    assert VARConfig.official(36, shared_aln=True).patch_nums == scales.SCHEDULES["512"]


def test_initialisation_follows_official_rule():
    cfg = VARConfig(depth=2, width=192, num_heads=3, patch_nums=(1, 2, 3, 4), vocab_size=256,
                    init_alng=1e-3)
    # Drawn in the stacked layout (nnx.vmap, one key per layer), inspected per layer.
    model = var_convert.relayout(VAR(cfg, rngs=nnx.Rngs(0)), scan_layers=False)
    std = math.sqrt(1 / (3 * cfg.width))
    blk = model.blocks[1]
    assert np.std(np.asarray(blk.attn.qkv_kernel[...])) == pytest.approx(std, rel=0.02)
    assert np.std(np.asarray(blk.ffn.fc1.kernel[...])) == pytest.approx(std, rel=0.02)
    scaled = std / math.sqrt(2 * cfg.depth)
    assert np.std(np.asarray(blk.attn.proj.kernel[...])) == pytest.approx(scaled, rel=0.03)
    assert np.std(np.asarray(blk.ffn.fc2.kernel[...])) == pytest.approx(scaled, rel=0.03)
    ada = np.asarray(blk.ada_lin.kernel[...])  # (C, 6, C): [g1, g2, s1, s2, b1, b2]
    assert np.std(ada[:, :2]) == pytest.approx(std * 1e-3, rel=0.03)
    assert np.std(ada[:, 2:]) == pytest.approx(std * 0.5, rel=0.03)
    assert np.std(np.asarray(model.head.kernel[...])) == pytest.approx(std * 0.02, rel=0.03)
    assert np.std(np.asarray(model.head_nm.ada_lin.kernel[...])) == pytest.approx(std * 0.5,
                                                                               rel=0.03)
    assert np.std(np.asarray(model.pos_1LC[...])) == pytest.approx(std, rel=0.05)
    np.testing.assert_allclose(blk.attn.scale_mul[...], math.log(4.0), rtol=1e-6)
    for zero in (blk.attn.q_bias, blk.attn.v_bias, blk.ada_lin.bias, model.head.bias):
        assert not np.any(np.asarray(zero[...]))
    # Plain normal, not truncated at 2 std (torch truncates at +-2 absolute).
    assert np.max(np.abs(np.asarray(blk.ffn.fc1.kernel[...]))) > 3 * std
    # Drop-path: linear from 0 over the blocks.
    rates = model.layer_inputs().drop_rate
    np.testing.assert_allclose(rates, np.linspace(0, cfg.drop_path_rate, cfg.depth), rtol=1e-6)
    # The layers were drawn with different keys.
    assert not np.allclose(model.blocks[0].ffn.fc1.kernel[...], model.blocks[1].ffn.fc1.kernel[...])


def test_shared_aln_init_and_shapes():
    cfg = dataclasses.replace(SMALL, shared_aln=True, init_alng=1e-3)
    model = VAR(cfg, rngs=nnx.Rngs(0))
    assert model.blocks.ada_gss[...].shape == (cfg.depth, 6, 32)
    gss = np.asarray(model.blocks.ada_gss[...][0])
    assert not hasattr(model.blocks, "ada_lin")
    assert np.std(gss[:2]) == pytest.approx(1e-3 / math.sqrt(32), rel=0.3)
    assert np.std(gss[2:]) == pytest.approx(0.5 / math.sqrt(32), rel=0.3)
    assert model.shared_ada_lin.kernel[...].shape == (32, 6, 32)
    labels, x = _inputs(cfg)
    assert _forward(model, labels, x).shape == (2, cfg.seq_len, cfg.vocab_size)


def test_block_causality_by_gradients():
    model = _perturbed(SMALL)
    layout = scales.token_layout(SMALL.patch_nums)
    labels, x = _inputs(SMALL)

    def per_scale(x_in):
        logits = model(labels, x_in)
        return jnp.stack([jnp.sum(logits[:, b:e] * jnp.cos(jnp.arange(logits.shape[-1])))
                          for b, e in layout.begin_ends])

    jac = jax.jit(jax.jacrev(per_scale))(x)  # (K, B, L-1, Cvae)
    # Input row r (of the L-1 rows) is the token of scale level_ids[r + 1].
    input_level = layout.level_ids[1:]
    for k in range(layout.num_scales):
        grad_rows = np.abs(np.asarray(jac[k])).sum(axis=(0, 2))
        assert np.all(grad_rows[input_level > k] == 0.0), f"scale {k} sees finer scales"
        assert np.all(grad_rows[input_level <= k] > 0.0), f"scale {k} misses coarser tokens"


@pytest.mark.parametrize("backend,options", [("exact", {}), ("favor", {"num_features": 32})])
def test_teacher_forcing_equals_sampling_path(backend, options):
    cfg = dataclasses.replace(SMALL, attn_backend=backend, attn_options=options)
    model = _perturbed(cfg)
    labels, x = _inputs(cfg)
    logits_tf = np.asarray(_forward(model, labels, x))
    layout = scales.token_layout(cfg.patch_nums)

    @nnx.jit
    def decode_all(model, labels, x):
        cond = model.condition(labels)
        states = model.init_decode_states(labels.shape[0])
        out = []
        for k, (b, e) in enumerate(layout.begin_ends):
            tokens = model.embed_scale(k, cond, None if k == 0 else x[:, b - 1:e - 1])
            logits_k, states = model.decode_scale(tokens, cond, states, k)
            out.append(logits_k)
        return out

    for k, logits_k in enumerate(decode_all(model, labels, x)):
        b, e = layout.begin_ends[k]
        np.testing.assert_allclose(logits_k, logits_tf[:, b:e], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,options", [("exact", {}), ("flash", {}), ("poly", {}),
                                             ("favor", {"num_features": 32})])
def test_a_coarse_prefix_gives_the_full_sequences_first_logits(backend, options):
    """Teacher forcing on the inputs of the leading scales only (the training recipe's coarse
    prefixes) gives the logits of those scales in the full sequence, with dropout keys too;
    a sequence that ends inside a scale is refused, naming the lengths that would do."""
    cfg = dataclasses.replace(SMALL, attn_backend=backend, attn_options=options,
                              cond_drop_rate=0.5)
    model = _perturbed(cfg)
    labels, x = _inputs(cfg, batch=4)
    key = jax.random.key(3)
    full = np.asarray(_train_forward(model, labels, x, key))
    for _, end in scales.token_layout(cfg.patch_nums).begin_ends[:-1]:
        prefix = np.asarray(_train_forward(model, labels, x[:, :end - 1], key))
        assert prefix.shape == (4, end, cfg.vocab_size)
        np.testing.assert_allclose(prefix, full[:, :end], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"leading scales.*one of \[1, 5, 14\] tokens, found 7"):
        model(labels, x[:, :6])


def test_exact_and_flash_agree():
    labels, x = _inputs(SMALL)
    exact = _forward(_perturbed(SMALL), labels, x)
    flash = _forward(_perturbed(dataclasses.replace(SMALL, attn_backend="flash")), labels, x)
    np.testing.assert_allclose(flash, exact, rtol=1e-5, atol=1e-5)


def test_label_dropout_and_drop_path_use_the_given_key():
    cfg = dataclasses.replace(SMALL, cond_drop_rate=1.0, drop_path_rate=0.0)
    model = _perturbed(cfg)
    labels, x = _inputs(cfg)
    uncond = _forward(model, jnp.full_like(labels, cfg.num_classes), x)
    dropped = _train_forward(model, labels, x, jax.random.key(0))
    np.testing.assert_allclose(dropped, uncond, rtol=1e-6, atol=1e-6)
    assert not np.allclose(_forward(model, labels, x), uncond)
    # Drop-path: random in training, reproducible with the same key, off in evaluation.
    cfg = dataclasses.replace(SMALL, cond_drop_rate=0.0, drop_path_rate=0.5)
    model = _perturbed(cfg)
    a = _train_forward(model, labels, x, jax.random.key(1))
    b = _train_forward(model, labels, x, jax.random.key(1))
    outs = [_train_forward(model, labels, x, jax.random.key(s)) for s in range(2, 6)]
    np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, o) for o in outs)
    with pytest.raises(ValueError, match="rngs"):
        model(labels, x, deterministic=False)


def test_max_temperature_clamps_logit_bound():
    cfg = dataclasses.replace(SMALL, max_temperature=3.0)
    model = _perturbed(cfg)
    model.blocks.attn.scale_mul[...] = jnp.log(jnp.array([[2.0, 50.0]] * cfg.depth))
    np.testing.assert_allclose(model.logit_bounds(), [3.0, 3.0], rtol=1e-6)
    model = var_convert.relayout(model, scan_layers=False)
    np.testing.assert_allclose(model.logit_bounds(), [3.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(model.blocks[0].attn.temperature(), [2.0, 3.0], rtol=1e-6)
    # The attention logits q.k really stay inside the bound.
    labels, x = _inputs(cfg)
    h = jax.random.normal(jax.random.key(3), (2, cfg.seq_len, cfg.width))
    q, k, _ = model.blocks[0].attn.qkv(h)
    assert float(jnp.max(jnp.abs(jnp.einsum("blhd,bmhd->bhlm", q, k)))) <= 3.0 + 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_mask_official_groups(scan_layers):
    import optax

    cfg = dataclasses.replace(SMALL, shared_aln=True, scan_layers=scan_layers)
    model = _perturbed(cfg)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    # With zero gradients AdamW moves exactly the decayed parameters.
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5,
                                           mask=var_lib.weight_decay_mask), wrt=nnx.Param)
    nnx.jit(lambda opt, model: opt.update(
        model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))))(opt, model)
    after = nnx.as_pure(nnx.state(model, nnx.Param))

    def names(tree):
        return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    moved = names(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))
    layers = [f"{i}." for i in range(cfg.depth)] if not scan_layers else [""]
    expected = sorted(
        ["class_emb.embedding", "word_embed.kernel", "head.kernel", "head_nm.ada_lin.kernel",
         "shared_ada_lin.kernel"]
        + [f"blocks.{i}{n}" for i in layers
           for n in ("attn.qkv_kernel", "attn.proj.kernel", "ffn.fc1.kernel",
                     "ffn.fc2.kernel")])
    assert sorted(k for k, v in moved.items() if v) == expected
    mask = names(var_lib.weight_decay_mask(model))
    assert sorted(k for k, v in mask.items() if v) == expected
    for name in ("pos_start", "pos_1LC", "lvl_embed.embedding", f"blocks.{layers[0]}attn.scale_mul",
                 f"blocks.{layers[0]}ada_gss", f"blocks.{layers[0]}attn.q_bias", "head.bias"):
        assert mask[name] is False


def test_token_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jnp.array([[0, 1, 2, 3, 4], [6, 5, 4, 3, 2]])
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(var_lib.token_cross_entropy(logits, targets), want, rtol=1e-6)
    maps = [jnp.zeros((2, p, p), jnp.int32) for p in (1, 2)]
    assert var_lib.flatten_token_maps(maps).shape == (2, 5)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="attn_backend"):
        VARConfig.tiny(attn_backend="fast")
    with pytest.raises(ValueError, match="num_heads"):
        VARConfig(depth=2, width=30, num_heads=4)
    with pytest.raises(ValueError, match="max_temperature"):
        VARConfig.tiny(max_temperature=0.0)
    model = _perturbed(SMALL)
    labels, x = _inputs(SMALL)
    with pytest.raises(ValueError, match="x_BxLm1xCvae"):
        model(labels, x[:, :-1])
    with pytest.raises(ValueError, match="labels_B"):
        model(labels[:1], x)
    assert VARConfig.from_dict(SMALL.to_dict()) == SMALL
