"""The two layouts of the VAR blocks compute the same function: stacked + ``nnx.scan`` (the
default) and a Python loop over separate blocks; checkpoints move between them losslessly."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _random_models import random_model
from flax import nnx

from var_jax import pretrained, sampling
from var_jax.convert import var as var_convert
from var_jax.models import construct
from var_jax.models.var import VAR, LayerKernels, VARConfig
from var_jax.models.vqvae import VQVAE, VQVAEConfig

PATCH_NUMS = (1, 2, 3)
LOOPED = VARConfig.tiny(depth=3, width=32, patch_nums=PATCH_NUMS, vocab_size=16, cvae=4,
                        num_classes=5, drop_path_rate=0.2, scan_layers=False)
# "auto" on a model where `plan` certifies poly: logits <= 0.1, head dim 4, L = 66.
AUTO_POLY = dict(attn_backend="auto", num_heads=8, patch_nums=(1, 2, 3, 4, 6),
                 max_temperature=0.1)
BACKENDS = [("exact", {}), ("flash", {}), ("poly", {"degree": 2}),
            ("favor", {"num_features": 16}), ("auto", AUTO_POLY)]


def _looped_model(config, seed=0):
    return random_model(lambda: VAR(config, rngs=nnx.Rngs(0)), seed)


def _pair(**changes):
    looped = _looped_model(dataclasses.replace(LOOPED, **changes))
    scanned = var_convert.relayout(looped, scan_layers=True)
    assert scanned.config.scan_layers and not looped.config.scan_layers
    return looped, scanned


def _inputs(config, batch=2):
    x = jax.random.normal(jax.random.key(0), (batch, config.seq_len - 1, config.cvae))
    return jnp.arange(batch) % config.num_classes, x


@nnx.jit
def _loss_and_grads(model, labels, x, key):
    def loss(model):
        logits = model(labels, x, deterministic=False, rngs=key)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return nnx.value_and_grad(loss)(model)


def _looped_grads(grads, depth):
    flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    return var_convert.unstack_layers(flat, depth)


@pytest.mark.parametrize("backend,options", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_scanned_equals_looped(backend, options):
    changes = (dict(options) if backend == "auto"
               else dict(attn_backend=backend, attn_options=options))
    looped, scanned = _pair(cond_drop_rate=0.3, **changes)
    labels, x = _inputs(looped.config)
    tf_looped = nnx.jit(lambda m: m(labels, x))(looped)
    tf_scanned = nnx.jit(lambda m: m(labels, x))(scanned)
    np.testing.assert_allclose(tf_scanned, tf_looped, rtol=1e-5, atol=1e-6)
    # A training step's gradients, with label dropout and drop-path on (same key).
    key = jax.random.key(7)
    loss_l, grads_l = _loss_and_grads(looped, labels, x, key)
    loss_s, grads_s = _loss_and_grads(scanned, labels, x, key)
    np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
    flat_l = _looped_grads(grads_l, LOOPED.depth)
    flat_s = _looped_grads(grads_s, LOOPED.depth)
    assert flat_l.keys() == flat_s.keys()
    for path in flat_l:
        np.testing.assert_allclose(flat_s[path], flat_l[path], rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))
    if backend == "auto":
        assert scanned.config.attention[0] == "poly"


def test_drop_path_really_acts_per_layer():
    looped, scanned = _pair(drop_path_rate=0.9, cond_drop_rate=0.0)
    labels, x = _inputs(looped.config)
    outs = [nnx.jit(lambda m, k: m(labels, x, deterministic=False, rngs=k))(scanned,
                                                                           jax.random.key(s))
            for s in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    np.testing.assert_allclose(scanned.layer_inputs().drop_rate, [0.0, 0.45, 0.9], rtol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_memory_not_the_function(remat):
    _, scanned = _pair()
    rematted = var_convert.relayout(scanned, scan_layers=False)
    rematted = var_convert.relayout(
        _with_config(rematted, dataclasses.replace(rematted.config, remat=remat)), True)
    labels, x = _inputs(scanned.config)
    key = jax.random.key(3)
    _, grads = _loss_and_grads(scanned, labels, x, key)
    _, grads_remat = _loss_and_grads(rematted, labels, x, key)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def _with_config(model, config):
    out = construct.abstract_model(lambda: VAR(config, rngs=nnx.Rngs(0)))
    return var_convert.assign_looped(out, var_convert.looped_params(model))


def test_sampler_gives_the_same_tokens_in_both_layouts():
    vae_cfg = VQVAEConfig.tiny(image_size=12, patch_nums=PATCH_NUMS, vocab_size=16,
                               z_channels=4, use_attn=False, use_mid_attn=False)
    vae = VQVAE(vae_cfg, rngs=nnx.Rngs(1))
    for backend, options in (("exact", {}), ("flash", {}), ("favor", {"num_features": 16}),
                             ("poly", {"degree": 2})):
        looped, scanned = _pair(attn_backend=backend, attn_options=options)
        labels = jnp.array([0, 3, 4])
        maps_l, images_l = sampling.sample(looped, vae, labels, key=5, cfg=2.0, top_k=8)
        maps_s, images_s = sampling.sample(scanned, vae, labels, key=5, cfg=2.0, top_k=8)
        for a, b in zip(maps_l, maps_s, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(images_s, images_l, atol=1e-5)
        assert len({int(t) for m in maps_s[1:] for t in np.ravel(m)}) > 1, backend


@pytest.mark.parametrize("backend,options", [("exact", {}), ("poly", {"degree": 2})],
                         ids=["kv_cache", "low_rank"])
def test_decode_variants_are_one_function(backend, options):
    """decode_scale of the scanned layout over its stacked kernels, over per-layer kernels
    read in place (``LayerKernels``, the sampler's path on a CPU) and unrolled (static layer
    slices, no while loop): the same logits and decode states, scale after scale."""
    _, scanned = _pair(attn_backend=backend, attn_options=options)
    cond = scanned.condition(jnp.array([0, 3]))
    in_place = scanned.decode_condition(cond, LayerKernels.split(scanned.blocks))
    assert in_place.kernels is not None
    variants = {"scan": (scanned.decode_condition(cond), False), "in_place": (in_place, False),
                "unrolled": (scanned.decode_condition(cond), True)}
    results = {}
    for name, (condition, unroll) in variants.items():
        states, x, out = scanned.init_decode_states(2), scanned.embed_scale(0, cond), []
        for si in range(len(PATCH_NUMS)):
            logits, states = scanned.decode_scale(x, condition, states, si,
                                                  unroll_layers=unroll)
            out.append(np.asarray(logits))
            if si + 1 < len(PATCH_NUMS):
                x = jax.random.normal(jax.random.key(si),
                                      (2, PATCH_NUMS[si + 1] ** 2, scanned.config.width))
        results[name] = (out, jax.tree.leaves(states))
    for name in ("in_place", "unrolled"):
        for a, b in zip(results["scan"][0], results[name][0], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        for a, b in zip(results["scan"][1], results[name][1], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_kernels_are_views_of_the_stacked_kernels_on_a_cpu():
    """On one CPU device the per-layer kernels share the stacked kernel's memory (no copy of
    the weights per sampling call) and hold its values."""
    _, scanned = _pair()
    kernels = LayerKernels.split(scanned.blocks)
    stacked = scanned.blocks.ffn.fc1.kernel[...]
    layers = kernels.per_layer["fc1"]
    assert len(layers) == scanned.config.depth
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(layer, stacked[i])
    if jax.default_backend() == "cpu":
        base, step = stacked.unsafe_buffer_pointer(), stacked[0].nbytes
        assert [a.unsafe_buffer_pointer() - base for a in layers] == \
            [i * step for i in range(len(layers))]


def test_state_dict_round_trip_and_converted_layouts(tmp_path):
    looped, scanned = _pair()
    sd = var_convert.var_state_dict(looped)
    for model in (looped, scanned):
        exported = var_convert.var_state_dict(model)
        assert exported.keys() == sd.keys()
        for key in sd:
            np.testing.assert_array_equal(exported[key], sd[key], err_msg=key)
    # Loading the official layout into a fresh scanned model stacks it exactly.
    fresh = construct.abstract_model(lambda: VAR(scanned.config, rngs=nnx.Rngs(0)))
    var_convert.load_var_state_dict(fresh, sd)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh, nnx.Param)),
                    jax.tree.leaves(nnx.state(scanned, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    # A converted directory records its layout and loads into either.
    vae = VQVAE(VQVAEConfig.tiny(image_size=12, patch_nums=PATCH_NUMS, vocab_size=16,
                                 z_channels=4, use_attn=False, use_mid_attn=False),
                rngs=nnx.Rngs(1))
    path = pretrained.Pipeline(scanned, vae).save(tmp_path / "scanned")
    assert json.loads((path / "config.json").read_text())["var"]["scan_layers"] is True
    for layout in (None, False, True):
        again = pretrained.load_converted(path, scan_layers=layout)
        assert again.var.config.scan_layers is (True if layout is None else layout)
        back = var_convert.var_state_dict(again.var)
        for key in sd:
            np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    # A directory written before the layout was recorded holds the looped layout.
    old = pretrained.Pipeline(looped, vae).save(tmp_path / "old")
    meta = json.loads((old / "config.json").read_text())
    del meta["var"]["scan_layers"], meta["var"]["remat"]
    (old / "config.json").write_text(json.dumps(meta))
    again = pretrained.load_converted(old)
    assert again.var.config.scan_layers is False
    again = pretrained.load_converted(old, scan_layers=True)
    np.testing.assert_array_equal(var_convert.var_state_dict(again.var)["head.weight"],
                                  sd["head.weight"])


def test_bad_layout_fields_fail_early():
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(LOOPED, remat="some")
    with pytest.raises(ValueError, match="scan_layers"):
        dataclasses.replace(LOOPED, scan_layers="yes")
    with pytest.raises(ValueError, match="eps"):
        dataclasses.replace(LOOPED, attn_backend="auto", attn_options={"degree": 2})


def _compiled_sampler_hlo(split_kernels: bool, scale_buckets: bool = False):
    vae_cfg = VQVAEConfig.tiny(image_size=12, patch_nums=PATCH_NUMS, vocab_size=16,
                               z_channels=4, use_attn=False, use_mid_attn=False)
    vae = VQVAE(vae_cfg, rngs=nnx.Rngs(1))
    _, scanned = _pair()
    sampler = sampling.Sampler(scanned, vae, scale_buckets=scale_buckets)
    run = sampling._compiled(sampler.var_graphdef, sampler.vae_graphdef, 8, False, False, False,
                             sampler.buckets)
    labels = jnp.array([0, 3, 4])
    kernels = LayerKernels.split(scanned.blocks) if split_kernels else None
    hlo = run.lower(sampler.var_state, sampler.vae_state, labels, jax.random.key(0),
                    jnp.float32(2.0), jnp.float32(1.0), jnp.float32(0.0), None, None,
                    kernels).compile().as_text()
    return scanned.config, labels, hlo


@pytest.mark.parametrize("scale_buckets", [False, True], ids=["per_scale", "buckets"])
def test_scanned_sampler_keeps_the_kv_cache_in_place(scale_buckets):
    """The compiled scanned sampler copies no whole stacked KV cache: the caches ride in the
    layer scan's carry and each layer writes only its new keys and values (scanned as xs / ys
    they were copied in and out at every layer and between scales); with the scales in
    buckets also through the scan over a bucket's scales."""
    cfg, labels, hlo = _compiled_sampler_hlo(split_kernels=True, scale_buckets=scale_buckets)
    stacked = f"f32[{cfg.depth},{2 * len(labels)},{cfg.seq_len},{cfg.num_heads},{cfg.head_dim}]"
    assert f"{stacked}" in hlo  # the cache is there ...
    copies = [line for line in hlo.splitlines() if f"= {stacked}" in line and " copy(" in line]
    assert len(copies) <= 1, copies  # ... and never copied whole (one: k and v made from one zeros)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU buffer behaviour")
def test_scanned_sampler_reads_layer_kernels_in_place():
    """With ``LayerKernels`` (the sampler's path on a CPU) no layer's slice of a stacked FFN
    kernel is cut out at any scale; over the stacked kernels every scale's scan cuts one."""
    def fc1_slices(hlo, cfg):
        shape = f"f32[1,{cfg.width},{cfg.hidden}]"
        return [line for line in hlo.splitlines()
                if f"= {shape}" in line and "dynamic-slice(" in line]

    cfg, _, hlo_in_place = _compiled_sampler_hlo(split_kernels=True)
    _, _, hlo_stacked = _compiled_sampler_hlo(split_kernels=False)
    assert len(fc1_slices(hlo_stacked, cfg)) >= len(PATCH_NUMS)
    assert fc1_slices(hlo_in_place, cfg) == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU layouts")
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_weight_gradients_take_no_transposed_copy_of_the_activations(scan_layers):
    """The blocks', embedding's and head's products run over flattened rows
    (``models.var.over_rows``), so each weight gradient contracts over one row axis: XLA:CPU
    transposes no activation or output gradient into (channels, B, L) for it, which it did
    for every product when the contraction ran over B and L (a sixth of the demo's VAR step)."""
    config = dataclasses.replace(LOOPED, scan_layers=scan_layers)
    model = VAR(config, rngs=nnx.Rngs(0))
    labels, x = _inputs(config, batch=3)
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(labels, x)
        return jnp.mean(logits ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    moved = [line.strip()[:120] for line in hlo.splitlines()
             for channels in (config.width, config.hidden, config.cvae, config.vocab_size)
             for rows in (config.seq_len, config.seq_len - 1)
             if f"= f32[{channels},3,{rows}]" in line
             and ("transpose(" in line or " copy(" in line)]
    assert moved == [], moved
