"""The training system: schedules, config checks, checkpoints with exact resume, the NaN
guard, both recipes on the tiny config, and an 8-device mesh in a subprocess."""

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import _repo
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from var_jax.train import config as config_lib
from var_jax.train import loop, optim, runner

ROOT = _repo.ROOT
tiny_test = _repo.load("configs/tiny_test.py")


def _lin0_reference(it, max_it, wp_it, wp0, wpe):
    if it < wp_it:
        return wp0 + (1 - wp0) * it / wp_it
    pasd = (it - wp_it) / (max_it - 1 - wp_it)
    return 1.0 if pasd < 0.05 else wpe + (1 - wpe) * (1 - pasd) / 0.95


def test_lin0_and_wd_schedules_match_the_official_formulas():
    for it in (0, 5, 9, 10, 11, 14, 50, 99):
        got = float(optim.lin0_fraction(it, 100, 10, 0.005, 0.01))
        assert got == pytest.approx(_lin0_reference(it, 100, 10, 0.005, 0.01), rel=1e-5)
    assert float(optim.lin0_fraction(99, 100, 10, wpe=0.1)) == pytest.approx(0.1, rel=1e-5)
    wd = optim.wd_schedule(0.05, 0.08, 101)
    assert float(wd(0)) == pytest.approx(0.05) and float(wd(100)) == pytest.approx(0.08)
    assert float(wd(50)) == pytest.approx(0.065, rel=1e-5)
    assert optim.peak_lr(1e-4, 768) == pytest.approx(3e-4)


def test_scale_loss_weights_reweigh_the_per_scale_token_means():
    """The VAR loss sum_k w_k * mean NLL of scale k equals a float64 token mean in which a token
    of scale k weighs (pn_k ** 2) ** -power: power 0 the official loss, 1 scales alike."""
    from var_jax.train import var_recipe

    patch_nums = (1, 2, 3, 5)
    counts = np.array([p * p for p in patch_nums])
    scale_of = np.repeat(np.arange(len(patch_nums)), counts)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, counts.sum(), 7)) * 2
    targets = rng.integers(0, 7, size=(3, counts.sum()))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]  # (B, L) float64
    m = var_recipe.token_metrics(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                 patch_nums)
    for power in (0.0, 0.3, 0.5, 1.0):
        w = var_recipe.scale_loss_weights(patch_nums, power)
        assert w.sum() == pytest.approx(1.0, rel=1e-6)
        token_w = counts[scale_of] ** -power
        want = (ce * token_w).sum() / (len(ce) * token_w.sum())
        got = float(jnp.sum(w * m["nll_per_scale"]))
        assert got == pytest.approx(want, rel=1e-5)
    assert float(jnp.sum(var_recipe.scale_loss_weights(patch_nums, 0.0) * m["nll_per_scale"])
                 ) == pytest.approx(ce.mean(), rel=1e-5)
    per_scale = [ce[:, scale_of == k].mean() for k in range(len(patch_nums))]
    assert float(jnp.sum(var_recipe.scale_loss_weights(patch_nums, 1.0) * m["nll_per_scale"])
                 ) == pytest.approx(np.mean(per_scale), rel=1e-5)


def test_var_weight_decay_groups_and_adamw_update():
    from var_jax.models.var import VAR

    config = config_lib.var_config(tiny_test.get_config())
    params = nnx.state(VAR(config, rngs=nnx.Rngs(0)), nnx.Param)
    from var_jax.models.var import weight_decay_mask

    flat = {jax.tree_util.keystr(p): m for p, m in
            jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))}
    decayed = [k for k, m in flat.items() if m]
    assert any("qkv_kernel" in k for k in decayed) and any("class_emb" in k for k in decayed)
    assert not any(n in k for k in decayed for n in ("bias", "pos_1LC", "lvl_embed",
                                                     "scale_mul"))
    # One AdamW step with zero gradients only decays: p <- p (1 - lr wd) where decayed.
    tx = optim.make_optimizer(lr=lambda s: 0.1, wd=0.5, b1=0.9, b2=0.95, clip=2.0,
                              mask=weight_decay_mask)
    grads = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def apply(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = apply(params, grads)
    mask = weight_decay_mask(params)
    leaves = (jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask))
    for p, n, m in zip(*leaves, strict=True):
        np.testing.assert_allclose(n, p * (0.95 if m else 1.0), rtol=1e-6, atol=1e-7)


def test_muon_orthogonalises_each_block_matrix_alone_in_both_layouts():
    """Muon's groups (`models.var.matrix_axes`): every block matrix and nothing else; each
    layer and each of q, k, v orthogonalised on its own (rank-one gradients 1e4 apart in size
    give updates of one size); the same update for the stacked and the looped layout."""
    from var_jax.convert import var as var_convert
    from var_jax.models.var import VAR, matrix_axes

    config = dataclasses.replace(config_lib.var_config(tiny_test.get_config()), depth=2,
                                 scan_layers=False)
    looped = VAR(config, rngs=nnx.Rngs(0))
    scanned = var_convert.relayout(looped, scan_layers=True)
    tx = optim.make_muon_optimizer(lr=lambda s: 1e-3, muon_lr=lambda s: 0.02, b1=0.9, b2=0.95,
                                   clip=0.0, matrix_axes=matrix_axes)

    def names(path):
        return tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)

    def gradient(path, x):
        # Layer 0's gradients 1e2 times layer 1's; q, k and v each rank one, q 1e4 times k.
        g = np.asarray(jax.random.normal(jax.random.key(len(path)), x.shape), np.float64)
        if names(path)[-1] == "qkv_kernel":  # (C, 3, H, D): q rank one and large, k small
            u = g[:, 0, 0, 0]
            g = np.einsum("c,thd->cthd", u, g[0])
            g[:, 0] *= 1e2
            g[:, 1] *= 1e-2
        layer = next((int(n) for n in names(path) if n.isdigit()), None)
        return jnp.asarray(g * (1e2 if layer == 0 else 1.0), jnp.float32)

    grads_looped = jax.tree_util.tree_map_with_path(
        gradient, nnx.as_pure(nnx.state(looped, nnx.Param)))
    flat = {names(path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(grads_looped)}
    stacked = var_convert.stack_layers({tuple(int(n) if n.isdigit() else n for n in k): v
                                        for k, v in flat.items()}, config.depth)

    def update(model, grads):
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        return {names(path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(updates)}

    up_looped = update(looped, grads_looped)
    params_scanned = nnx.as_pure(nnx.state(scanned, nnx.Param))
    grads_scanned = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(stacked[names(path)]), params_scanned)
    up_scanned = update(scanned, grads_scanned)
    for key, value in up_looped.items():
        if key[0] == "blocks":  # ("blocks", layer, ...) -> layer `layer` of ("blocks", ...)
            other = up_scanned[key[:1] + key[2:]][int(key[1])]
        else:
            other = up_scanned[key]
        np.testing.assert_allclose(value, other, rtol=2e-4, atol=1e-7, err_msg=str(key))

    muon = sorted(".".join(names(path)) for path, x in
                  jax.tree_util.tree_leaves_with_path(params_scanned)
                  if matrix_axes(path, x.shape) is not None)
    assert muon == ["blocks.ada_lin.kernel", "blocks.attn.proj.kernel",
                    "blocks.attn.qkv_kernel", "blocks.ffn.fc1.kernel", "blocks.ffn.fc2.kernel"]
    qkv = [up_looped[("blocks", str(i), "attn", "qkv_kernel")] for i in range(2)]
    norms = np.array([[np.linalg.norm(q[:, t]) for t in range(3)] for q in qkv])
    # Adam would scale each entry alike; Muon gives every orthogonalised matrix the same size
    # however large its gradient (rank one: one singular value near 1 times the same lr).
    assert norms.max() / norms.min() < 2.0, norms
    # A parameter Adam handles: its first (Nesterov) update is the sign of the gradient times
    # lr (1 + b1 (1 - b1) / (1 - b1^2)), whatever the gradient's size.
    pos = up_looped[("pos_1LC",)]
    np.testing.assert_allclose(np.abs(pos), 1e-3 * (1 + 0.9 * 0.1 / (1 - 0.81)), rtol=1e-3)


def test_config_validation_names_the_field():
    config = tiny_test.get_config()
    config_lib.validate(config, num_devices=1)
    bad = tiny_test.get_config()
    bad.unlock()
    bad.train.learning_rat = 0.1
    with pytest.raises(ValueError, match="train.learning_rat"):
        config_lib.validate(bad)
    bad = tiny_test.get_config()
    bad.var.optimizer = "lion"
    with pytest.raises(ValueError, match="var.optimizer must be one of"):
        config_lib.validate(bad)
    bad = tiny_test.get_config()
    bad.var.batch_size = 0
    with pytest.raises(ValueError, match="var.batch_size"):
        config_lib.validate(bad)
    bad = tiny_test.get_config()
    bad.var.batch_size = 6
    with pytest.raises(ValueError, match="var.batch_size"):
        config_lib.validate(bad, num_devices=4)
    bad = tiny_test.get_config()
    bad.var.model.vocab_size = 17
    with pytest.raises(ValueError, match="var.model.vocab_size"):
        config_lib.validate(bad)
    bad = tiny_test.get_config()
    bad.tokenizer.model.colour = 3
    with pytest.raises(ValueError, match="tokenizer.model.colour"):
        config_lib.validate(bad)
    bad = tiny_test.get_config()
    bad.tokenizer.model.image_size = 12
    with pytest.raises(ValueError, match="tokenizer.model"):
        config_lib.validate(bad)
    # Through the command line: an unknown --config.x override fails in flag parsing.
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}", "--workdir=/nonexistent",
         "--config.var.nonsense=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "nonsense" in out.stderr


class ToyRecipe(loop.RecipeDefaults):
    """A linear classifier on digits: the loop's behaviour without a big compile."""

    name = "toy"

    def __init__(self, steps, num_classes=10):
        self.steps, self.batch_size, self.num_classes = steps, 8, num_classes

    def create_model(self, key):
        return nnx.Linear(8 * 8 * 3, self.num_classes, rngs=nnx.Rngs(params=key))

    def optimizer(self):
        lr = optim.lin0_schedule(0.05, self.steps, 1)
        return optim.make_optimizer(lr=lr, wd=0.01, b1=0.9, b2=0.95), lr

    def loss(self, model, frozen, batch, key):
        logits = model(batch["image"].reshape(batch["image"].shape[0], -1))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        noise = jax.random.uniform(key, ()) * 1e-3 * frozen["noise"]  # uses the step key
        return loss + noise, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    def frozen(self):
        return {"noise": jnp.ones(())}


def _toy_config(every=2):
    c = tiny_test.get_config()
    c.train.checkpoint_every = every
    c.train.sample_every = 0
    return c


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state["params"])]


def test_coarse_prefixes_join_the_coarse_scales_means_in_the_loss():
    """`var.coarse_batch_size`: the pipeline's batch is split into full sequences and coarse
    prefixes, and the loss is the scale-weighted NLL with each coarse scale's mean taken over
    both, against the same means computed from the full sequences' logits of every example."""
    from var_jax import scales
    from var_jax.models.vqvae import VQVAE
    from var_jax.train import var_recipe
    config = tiny_test.get_config()
    config.var.coarse_batch_size, config.var.coarse_scales = 8, 2
    config.var.model.cond_drop_rate = 0.0  # no randomness: the two computations must agree
    config.var.scale_weight_power = 0.5
    config_lib.validate(config, num_devices=1)
    tokenizer = VQVAE(config_lib.vqvae_config(config), rngs=nnx.Rngs(0))
    recipe = var_recipe.VARRecipe(config, tokenizer)
    assert recipe.batch_size == 16
    rng = np.random.RandomState(0)
    batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
             "label": rng.randint(0, 10, 16).astype(np.int32)}
    split = recipe.prepare_batch(batch)
    np.testing.assert_array_equal(split["label"], batch["label"][:8])
    np.testing.assert_array_equal(split["coarse"]["label"], batch["label"][8:])
    model = recipe.create_model(jax.random.key(1))
    loss, metrics = nnx.jit(lambda m, b: recipe.loss(m, recipe.frozen(), b,
                                                     jax.random.key(2)))(model, split)

    targets, x = jax.jit(lambda images: recipe.tokens(recipe.frozen(), images))(batch["image"])
    logits = nnx.jit(lambda m: m(batch["label"], x))(model)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    means = []
    for k, (b, e) in enumerate(scales.token_layout(recipe.patch_nums).begin_ends):
        rows = 16 if k < 2 else 8  # the coarse scales over all 16 examples, the last over 8
        means.append(jnp.mean(nll[:rows, b:e]))
    expected = jnp.sum(recipe.scale_weights * jnp.stack(means))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["coarse_nll"], jnp.mean(nll[8:, :5]), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], jnp.mean(nll[:8]), rtol=1e-5)
    # The official recipe (no coarse batch) is untouched, and bad sizes fail in validation.
    config.var.coarse_scales = 3
    with pytest.raises(ValueError, match=r"var.coarse_scales must be an int from 1 to 2"):
        config_lib.validate(config)
    config.var.coarse_scales, config.var.coarse_batch_size = 2, 6
    with pytest.raises(ValueError, match=r"var.coarse_batch_size=6 must split into 1 "):
        config_lib.validate(config, num_devices=4)


class CountingToyRecipe(ToyRecipe):
    """ToyRecipe that counts its evaluations and sample grids."""

    def __init__(self, steps):
        super().__init__(steps)
        self.calls = {"evaluate": 0, "sample_grid": 0}

    def evaluate(self, model, frozen):
        self.calls["evaluate"] += 1
        return {"score": 1.0}

    def sample_grid(self, model, frozen, key):
        self.calls["sample_grid"] += 1
        return np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize("at_end", [True, False])
def test_evaluation_after_the_last_step_follows_evaluate_at_end(tmp_path, at_end):
    """The demo evaluates its models on the test set itself, so its stages skip their own
    evaluation and sample grid after the last step (train.evaluate_at_end=False)."""
    config = _toy_config(every=3)
    config.train.evaluate_at_end = at_end
    recipe = CountingToyRecipe(3)
    trainer = loop.Trainer(recipe, config, str(tmp_path))
    summary = trainer.run()
    trainer.close()
    assert recipe.calls == {"evaluate": int(at_end), "sample_grid": int(at_end)}
    assert summary["eval"] == ({"score": 1.0} if at_end else {})
    assert len(summary["samples"]) == int(at_end)
    assert summary["checkpoints"] == [3]  # the last step is saved either way


def test_exact_resume_equals_an_uninterrupted_run(tmp_path):
    straight = loop.Trainer(ToyRecipe(4), _toy_config(every=1), str(tmp_path / "a"))
    straight.run()
    straight.close()
    assert straight.checkpointer.all_steps() == [3, 4]  # keep_checkpoints=2
    first = loop.Trainer(ToyRecipe(4), _toy_config(), str(tmp_path / "b"))
    first.run(num_steps=2)
    saved = _params(first)
    first.close()
    resumed = loop.Trainer(ToyRecipe(4), _toy_config(), str(tmp_path / "b"))
    assert resumed.step == 2
    for a, b in zip(saved, _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed.run()
    resumed.close()
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(x) for x in open(tmp_path / "b" / "toy" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert os.listdir(tmp_path / "b" / "toy" / "tb")


def test_profile_window_traces_its_steps_and_changes_nothing(tmp_path, capsys):
    """train.profile_steps / profile_skip: a jax.profiler trace (TensorBoard's .xplane.pb and a
    Perfetto .trace.json.gz holding the train step) of the chosen steps, closed when the run
    ends inside the window; the parameters are those of a run without it."""
    import glob
    import gzip

    plain = loop.Trainer(ToyRecipe(5), _toy_config(every=10), str(tmp_path / "plain"))
    plain.run()
    plain.close()
    config = _toy_config(every=10)
    config.train.profile_steps, config.train.profile_skip = 2, 1
    config_lib.validate(config, num_devices=1)
    traced = loop.Trainer(ToyRecipe(5), config, str(tmp_path / "traced"))
    traced.run()
    traced.close()
    for a, b in zip(_params(plain), _params(traced), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "profiled steps 2-3 into" in capsys.readouterr().out
    runs = glob.glob(str(tmp_path / "traced" / "toy" / "profile" / "plugins" / "profile" / "*"))
    assert len(runs) == 1
    xplanes = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    assert xplanes and all(os.path.getsize(f) > 0 for f in xplanes)
    perfetto = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
    assert perfetto
    names = {e.get("name", "") for e in json.load(gzip.open(perfetto[0]))["traceEvents"]}
    assert any("train_step" in n for n in names)
    assert not os.path.exists(tmp_path / "plain" / "toy" / "profile")

    # A run that ends inside its window closes the trace and says which steps it holds.
    config.train.profile_steps = 10
    short = loop.Trainer(ToyRecipe(3), config, str(tmp_path / "short"))
    short.run()
    short.close()
    assert "profiled steps 2-3 into" in capsys.readouterr().out
    assert glob.glob(str(tmp_path / "short" / "toy" / "profile" / "plugins" / "profile" / "*"
                         / "*.xplane.pb"))
    config.train.profile_steps = -1
    with pytest.raises(ValueError, match="train.profile_steps must be >= 0"):
        config_lib.validate(config)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poisoned(ToyRecipe):
        """The 4th batch holds a NaN, so the 4th step's loss is NaN."""

        def prepare_batch(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 4:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            return batch

    trainer = loop.Trainer(Poisoned(8), _toy_config(every=2), str(tmp_path))
    with pytest.raises(loop.NonFiniteLossError, match="step 4.*last good checkpoint is step 2"):
        trainer.run()
    trainer.checkpointer.wait()
    assert trainer.checkpointer.all_steps() == [2]
    assert all(np.isfinite(x).all() for x in _params(trainer))
    trainer.close()
    # A restart resumes from the last good checkpoint.
    again = loop.Trainer(ToyRecipe(8), _toy_config(every=2), str(tmp_path))
    assert again.step == 2
    again.close()


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


def test_tokenizer_two_steps_write_checkpoint_metrics_grid_and_resume(tiny_workdir):
    """Two steps through the runner, then a resumed trainer whose step compiles without
    YNNPACK fusions on a CPU (the recipe's `xla_options`; XLA's defaults put some there)."""
    config = tiny_test.get_config()
    summary = runner.run_stage(config, tiny_workdir, "tokenizer")
    run_dir = os.path.join(tiny_workdir, "tokenizer")
    assert summary["step"] == 2 and summary["checkpoints"] == [2]
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "2"))
    assert summary["samples"] and os.path.exists(summary["samples"][0])
    assert 0 < summary["eval"]["psnr"] < 60 and 0 < summary["eval"]["code_usage_mean"] <= 1
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert all(math.isfinite(r["loss"]) for r in rows if r["split"] == "train")
    from var_jax.train import tokenizer_recipe

    recipe = tokenizer_recipe.TokenizerRecipe(config)
    restored = loop.Trainer(recipe, config, tiny_workdir)
    assert restored.step == 2
    if jax.default_backend() == "cpu":  # compiled as the loop compiles it: XLA's own convolutions
        from var_jax.train import sharding

        batch = sharding.put_batch(recipe.prepare_batch(next(restored.iterator)), restored.mesh)
        restored._compile(batch, restored._stop_array(False))
        assert "__ynn_fusion" not in restored.step_fn.as_text()
    again = loop.restore_model(tokenizer_recipe.TokenizerRecipe(config), run_dir)
    for a, b in zip(jax.tree.leaves(nnx.state(restored.model(), nnx.Param)),
                    jax.tree.leaves(nnx.state(again, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    restored.close()


def test_compiler_options_fall_back_to_xlas_defaults_where_unknown(monkeypatch):
    """The tokenizer recipe asks for `xla_options`' convolution options on a CPU (the loop
    compiles its step with them: the tokenizer test above), other recipes for none; an XLA that
    does not know an option compiles with its defaults, and the option is not offered again."""
    from var_jax import xla_options
    from var_jax.train import tokenizer_recipe

    on_cpu = jax.default_backend() == "cpu"
    recipe = tokenizer_recipe.TokenizerRecipe(tiny_test.get_config())
    assert recipe.compiler_options() == (xla_options.CPU_CONVOLUTIONS if on_cpu else ())
    assert loop.RecipeDefaults().compiler_options() == ()
    assert xla_options.convolution_options([jnp.float32, jnp.bfloat16]) == ()
    monkeypatch.setattr(xla_options, "CPU_CONVOLUTIONS", (("xla_cpu_no_such_option", ""),))
    monkeypatch.setattr(xla_options, "_known", {"convolutions": True})
    lowered = jax.jit(lambda x: 2 * x).lower(jnp.ones(3))
    options = xla_options.convolution_options([jnp.float32])
    np.testing.assert_array_equal(xla_options.compile_lowered(lowered, options)(jnp.ones(3)),
                                  [2, 2, 2])
    assert xla_options._known == {"convolutions": not on_cpu}
    assert xla_options.convolution_options([jnp.float32]) == ()


def test_var_two_steps_on_the_frozen_tokenizer_with_token_cache(tiny_workdir):
    config = tiny_test.get_config()
    config.var.cache_tokens = True
    if not os.path.exists(os.path.join(tiny_workdir, "tokenizer", "checkpoints")):
        runner.run_stage(config, tiny_workdir, "tokenizer")
    summary = runner.run_stage(config, tiny_workdir, "var")
    # The cache holds exactly what the frozen tokenizer gives on the fly (training examples).
    from var_jax import data
    from var_jax.models.var import flatten_token_maps
    from var_jax.train import var_recipe

    cache_path = os.path.join(tiny_workdir, "var", "token_cache.npz")
    tokenizer = var_recipe.load_trained_tokenizer(config, os.path.join(tiny_workdir, "tokenizer"))
    cache = var_recipe.build_token_cache(config, tokenizer, cache_path)
    source = data.make_source(config.data, "train")
    assert cache.shape == (len(source), 1 + 4 + 16)
    batch = data.normalize({"image": source.images[:8], "label": source.labels[:8]})
    fresh = flatten_token_maps(tokenizer.images_to_indices(jnp.asarray(batch["image"])))
    np.testing.assert_array_equal(cache[:8], np.asarray(fresh))
    # The same parameters under another scale schedule give other tokens: the cache is rebuilt.
    from var_jax.train import tokenizer_recipe

    finer = tiny_test.get_config()
    finer.tokenizer.model.patch_nums = (1, 2, 3, 4)
    other = tokenizer_recipe.TokenizerRecipe(finer).create_model(jax.random.key(1)).vqvae
    nnx.update(other, nnx.state(tokenizer, nnx.Param))
    assert var_recipe.build_token_cache(finer, other, cache_path).shape == (len(source), 30)
    assert summary["step"] == 2 and summary["checkpoints"] == [2]
    # Near-uniform predictions over 16 codes after 2 steps.
    assert abs(summary["eval"]["token_nll"] - math.log(16)) < 0.5
    assert "token_acc_scale2" in summary["eval"]
    assert summary["samples"] and os.path.exists(summary["samples"][0])
    rows = [json.loads(x) for x in open(os.path.join(tiny_workdir, "var", "metrics.jsonl"))]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows[0]["loss_per_scale"]) == 3


def test_eight_device_mesh_in_a_subprocess(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import importlib.util
        spec = importlib.util.spec_from_file_location("test_train", {__file__!r})
        test_train = importlib.util.module_from_spec(spec); spec.loader.exec_module(test_train)
        import jax, numpy as np
        ToyRecipe, _toy_config = test_train.ToyRecipe, test_train._toy_config
        from var_jax.train import loop
        assert jax.device_count() == 8
        c = _toy_config(); c.mesh.data = 4; c.mesh.fsdp = 2
        c.mesh.fsdp_min_size = 1  # split even the toy's small kernel
        t = loop.Trainer(ToyRecipe(3), c, {str(tmp_path / "mesh")!r})
        kernel = t.state["params"]["kernel"]
        print("SPEC", kernel.sharding.spec, "MESH", dict(t.mesh.shape))
        out = t.run(); t.close()
        print("LOSS", out["train"]["loss"])
    """)
    tests_dir = os.path.join(ROOT, "tests")  # for test_train's own `import _repo`
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'data': 4" in out.stdout and "'fsdp': 2" in out.stdout
    assert "fsdp" in out.stdout.split("SPEC")[1].split("MESH")[0]
    loss_8 = float(out.stdout.split("LOSS")[1])
    single = loop.Trainer(ToyRecipe(3), _toy_config(), str(tmp_path / "one"))
    loss_1 = single.run()["train"]["loss"]
    single.close()
    assert loss_8 == pytest.approx(loss_1, rel=1e-4)


def test_every_model_field_is_settable_and_imagenet_recipes_use_bf16_flash():
    import dataclasses

    from var_jax.attention import registry
    from var_jax.models.var import VARConfig
    from var_jax.models.vqvae import VQVAEConfig

    c = config_lib.base_config()
    assert set(c.var.model) == {f.name for f in dataclasses.fields(VARConfig)}
    assert set(c.tokenizer.model) == {f.name for f in dataclasses.fields(VQVAEConfig)}
    names = {o.name for backend in registry.BACKENDS.values() for o in backend.options}
    assert set(config_lib.ATTN_OPTION_TYPES) == names
    # Fields the file leaves alone (None defaults, options) take values; unset options vanish.
    c = tiny_test.get_config()
    c.var.model.attn_backend = "poly"
    c.var.model.attn_options.degree = 4
    c.var.model.init_std = 0.01
    var = config_lib.var_config(c)
    assert var.attn_options == (("degree", 4),) and var.init_std == 0.01
    imagenet = _repo.load("configs/imagenet.py")

    for arg in imagenet.RECIPES:
        model = config_lib.var_config(imagenet.get_config(arg))
        official = VARConfig.official(int(arg[1:]), shared_aln=arg == "d36")
        assert (model.dtype, model.attn_backend) == ("bfloat16", "flash")
        assert (model.width, model.num_heads, model.patch_nums) == (
            official.width, official.num_heads, official.patch_nums)


def _documented_commands() -> list[str]:
    """Every `python scripts/...` command in README.md, WORKSPACE.md and config docstrings."""
    import glob
    import re

    found = []
    for path in ("README.md", "WORKSPACE.md"):
        found += re.findall(r"`(python scripts/[^`]+)`", open(os.path.join(ROOT, path)).read())
    for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
        text = open(path).read().replace("\\\n", " ")
        found += re.findall(r"^\s*(python scripts/\S.*)$", text, flags=re.M)
    return [" ".join(c.replace("[", " ").replace("]", " ").split()) for c in found]


_CHECK_COMMANDS = """
import json, runpy, shlex, sys
from absl import flags
for command in json.loads(sys.argv[1]):
    argv = shlex.split(command)[1:]
    before = set(flags.FLAGS)
    module = runpy.run_path(argv[0], run_name="documented_command")
    if "parse_flags" in module:  # scripts/train.py: its own flags, and a real --dry_run
        module["run"](argv + ["--dry_run"])
    else:
        flags.FLAGS(argv)
        flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    print("OK", command, flush=True)
"""


def test_every_documented_command_parses_and_dry_runs():
    commands = _documented_commands()
    assert len(commands) >= 9 and any("imagenet.py:d16" in c for c in commands)
    out = subprocess.run([sys.executable, "-c", _CHECK_COMMANDS, json.dumps(commands)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("OK ") == len(commands)
    # Model fields no config file writes are settable from the command line.
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--dry_run",
         f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}", "--workdir=unused",
         "--config.var.model.attn_backend=flash", "--config.var.model.max_temperature=5.0",
         "--config.var.model.attn_options.group_tokens=4", "--config.var.model.dtype=bfloat16",
         "--config.tokenizer.model.precision=default"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "config valid" in out.stdout, out.stderr[-3000:]


def test_half_written_checkpoints_are_passed_over_with_a_warning(tmp_path, capsys):
    first = loop.Trainer(ToyRecipe(6), _toy_config(every=2), str(tmp_path))
    first.run(num_steps=4)
    saved = _params(first)
    first.close()
    ckpts = tmp_path / "toy" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["2", "4"]
    # An Orbax temporary folder of an interrupted save, and a step folder that does not read.
    (ckpts / "5.orbax-checkpoint-tmp-1234").mkdir()
    shutil.copytree(ckpts / "4", ckpts / "6")
    for root, _, files in os.walk(ckpts / "6" / "state"):
        for name in files:
            open(os.path.join(root, name), "wb").write(b"\0garbage")
    again = loop.Trainer(ToyRecipe(6), _toy_config(every=2), str(tmp_path))
    out = capsys.readouterr().out
    assert again.step == 4, out
    assert "5.orbax-checkpoint-tmp-1234" in out and "step 6" in out and "passing over" in out
    for a, b in zip(saved, _params(again), strict=True):
        np.testing.assert_array_equal(a, b)
    again.run()
    again.close()
    assert again.step == 6 and 6 in again.checkpointer.all_steps()


def test_a_checkpoint_of_another_model_is_refused_by_name_and_left_in_place(tmp_path):
    first = loop.Trainer(ToyRecipe(4), _toy_config(every=2), str(tmp_path))
    first.run(num_steps=4)
    saved = _params(first)
    first.close()
    ckpts = tmp_path / "toy" / "checkpoints"
    # Another config (12 outputs instead of 10) is a mistake to report, not a broken save to
    # pass over: resuming must neither start afresh nor move the checkpoints aside.
    with pytest.raises(ValueError, match=r"step 4 .*another model.*params/kernel/value: "
                                         r"checkpoint \(192, 10\), config \(192, 12\)"):
        loop.Trainer(ToyRecipe(4, num_classes=12), _toy_config(every=2), str(tmp_path))
    with pytest.raises(ValueError, match=r"params/bias/value: checkpoint \(10,\), config "):
        loop.restore_model(ToyRecipe(4, num_classes=12), str(tmp_path / "toy"), step=2)
    # The same parameters under another optimiser: the message names the optimiser.
    class MomentumToy(ToyRecipe):
        def optimizer(self):
            return optax.sgd(0.1, momentum=0.9), (lambda step: 0.1)

    with pytest.raises(ValueError, match=r"same parameters with another optimiser's state"):
        loop.restore_model(MomentumToy(4), str(tmp_path / "toy"), step=4)
    assert sorted(os.listdir(ckpts)) == ["2", "4"]
    again = loop.Trainer(ToyRecipe(4), _toy_config(every=2), str(tmp_path))
    assert again.step == 4
    for a, b in zip(saved, _params(again), strict=True):
        np.testing.assert_array_equal(a, b)
    again.close()


def test_stacked_layer_axis_is_never_split_and_threshold_is_config_data():
    from jax.tree_util import DictKey, SequenceKey

    from var_jax.train import sharding

    stacked = (DictKey("blocks"), DictKey("attn"), DictKey("qkv_kernel"))
    looped = (DictKey("blocks"), SequenceKey(0), DictKey("attn"), DictKey("qkv_kernel"))
    assert sharding.stacked_layer_axis(stacked) and not sharding.stacked_layer_axis(looped)
    # (depth, C, 3, H, D): depth 16 is the largest dim but is the layer axis -> C is split.
    assert sharding.param_spec((16, 8, 3, 2, 4), 8, 1, skip_leading=True) == jax.P(
        None, "fsdp", None, None, None)
    assert sharding.param_spec((16, 8, 3, 2, 4), 8, 1) == jax.P("fsdp", None, None, None, None)
    assert sharding.param_spec((16, 8, 3, 2, 4), 8, 10**6) == jax.P()  # under the threshold
    assert sharding.param_spec((16, 3), 8, 1, skip_leading=True) == jax.P()  # nothing divides


def test_bad_inputs_name_the_field_or_flag():
    c = tiny_test.get_config()
    c.var.scale_weight_power = 1.5
    with pytest.raises(ValueError, match=r"var\.scale_weight_power must be a number in \[0, 1\]"):
        config_lib.validate(c)
    c = tiny_test.get_config()
    c.sample.guidance_power = -0.5
    with pytest.raises(ValueError, match=r"sample\.guidance_power must be a finite number >= 0"):
        config_lib.validate(c)
    c = tiny_test.get_config()
    c.mesh.data, c.mesh.fsdp = 4, 4
    with pytest.raises(ValueError, match=r"mesh\.data x mesh\.fsdp must equal the 8 devices"):
        config_lib.validate(c, num_devices=8)
    c = tiny_test.get_config()  # batch 8 over 2 processes x 8 local devices: 4 per process
    c.tokenizer.batch_size = 32
    with pytest.raises(ValueError, match=r"var\.batch_size=8 must split into 2 per-process"):
        config_lib.validate(c, num_devices=16, num_processes=2)
    from var_jax.train import sharding

    c.mesh.fsdp = 3
    with pytest.raises(ValueError, match=r"mesh\.fsdp to divide the 8 devices, found 3"):
        sharding.mesh_shape(c.mesh, 8)
    # Nothing listens at the coordinator: a clear error naming the flag within the timeout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}", "--workdir=unused",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
         "--initialization_timeout=3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "--coordinator_address" in out.stderr
    assert "no coordinator reachable" in out.stderr
    assert time.time() - t < 60


def test_tokenizer_evaluation_and_token_cache_compile_with_xlas_own_convolutions(tmp_path):
    """The tokenizer's evaluation and the VAR's token cache are convolutional programs: on a CPU
    they compile without YNNPACK fusions (xla_options.jit), and give what the model computes."""
    from var_jax import xla_options
    from var_jax.models import var as var_lib
    from var_jax.models.vqvae import VQVAE
    from var_jax.train import tokenizer_recipe, var_recipe

    config = tiny_test.get_config()
    vqvae = VQVAE(config_lib.vqvae_config(config), rngs=nnx.Rngs(0))
    size = config.data.image_size
    images = jax.random.uniform(jax.random.key(1), (3, size, size, 3), minval=-1, maxval=1)
    psnr, mse, hits, recon = tokenizer_recipe._eval_batch(vqvae, images)
    expected = vqvae.decode_features(vqvae.features_to_indices(vqvae.encode_features(images))[1])
    np.testing.assert_allclose(recon, expected, atol=1e-5)
    assert psnr.shape == mse.shape == (3,) and hits.shape[0] == len(vqvae.patch_nums)
    graphdef, state = nnx.split(vqvae)
    options = xla_options.convolution_options_for(state)
    if jax.default_backend() == "cpu":
        assert options == xla_options.CPU_CONVOLUTIONS
        program = tokenizer_recipe._eval_program(graphdef, options).lower(state, images)
        assert "__ynn_fusion" not in program.compile().as_text()
    tokens = var_recipe.build_token_cache(config, vqvae, str(tmp_path / "cache.npz"))
    from var_jax import data as data_lib

    train = data_lib.make_source(config.data, "train")
    first = data_lib.normalize({"image": train.images[:4], "label": train.labels[:4]})["image"]
    np.testing.assert_array_equal(
        tokens[:4], var_lib.flatten_token_maps(vqvae.images_to_indices(jnp.asarray(first))))
