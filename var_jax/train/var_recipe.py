"""VAR transformer training on the generic loop, with a frozen tokenizer.

Tokens are computed on the fly from each image batch with the frozen VQ-VAE (as the official
code does), or, with `var.cache_tokens` and a source without random augmentation, once for the
whole training set (saved beside the run as token_cache.npz, looked up by example index).
Then: the teacher-forcing inputs, the VAR logits (label dropout `cond_drop_rate` inside the
model when training), and the plain mean cross-entropy over all L tokens. Optimizer: AdamW
(0.9, 0.95) with the official decay groups, lr = base_lr * batch / 256 with linear warmup then
'lin0', weight decay cosine twd -> twde, global-norm clip 2.0. Logged per scale: loss and
accuracy; evaluation reports the token NLL and accuracy on held-out images.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import data as data_lib
from var_jax import scales, xla_options
from var_jax.evaluate import figures
from var_jax.models import var as var_lib
from var_jax.models.vqvae import VQVAE
from var_jax.train import config as config_lib
from var_jax.train import loop, optim, tokenizer_recipe


def load_trained_tokenizer(config, tokenizer_dir: str, step: int | None = None,
                           mesh=None) -> VQVAE:
    """The VQ-VAE from the latest (or given) checkpoint of a tokenizer run directory
    (replicated on `mesh` when given, so it computes alongside a model on that mesh)."""
    recipe = tokenizer_recipe.TokenizerRecipe(config)
    return loop.restore_model(recipe, tokenizer_dir, step, mesh).vqvae


def load_trained_var(config, tokenizer: VQVAE, var_dir: str, step: int | None = None):
    """The VAR transformer from the latest (or given) checkpoint of a VAR run directory."""
    return loop.restore_model(VARRecipe(config, tokenizer), var_dir, step)


def build_token_cache(config, tokenizer: VQVAE, path: str, batch_size: int = 500) -> np.ndarray:
    """Token maps (N, L) int32 of every training example, in source order; reused from `path`
    when it was built from the same data, tokenizer parameters and scale schedule."""
    source = data_lib.make_source(config.data, "train")
    if not isinstance(source, data_lib.ArraySource):
        raise ValueError("var.cache_tokens: expected an in-memory source (fashion_mnist, "
                         f"digits), found {type(source).__name__}")
    leaves = jax.tree.leaves(nnx.state(tokenizer, nnx.Param))
    fingerprint = float(sum(float(jnp.sum(jnp.abs(x))) for x in leaves))
    # The same parameters give other tokens under another scale schedule, so both are checked.
    patch_nums = np.asarray(tokenizer.patch_nums, np.int32)
    if os.path.exists(path):
        with np.load(path) as cached:
            if cached["tokens"].shape[0] == len(source) and \
                    float(cached["fingerprint"]) == fingerprint and \
                    "patch_nums" in cached and np.array_equal(cached["patch_nums"], patch_nums):
                return cached["tokens"]
    graphdef, state = nnx.split(tokenizer)

    def encode_batch(state, images):
        vq = nnx.merge(graphdef, state)
        return var_lib.flatten_token_maps(vq.images_to_indices(images))

    # A convolutional program: on a CPU XLA's own convolutions encode the demo's training set
    # 1.7x faster than YNNPACK's (:mod:`var_jax.xla_options`).
    encode = xla_options.jit(encode_batch, xla_options.convolution_options_for(state))
    parts = []
    for i in range(0, len(source), batch_size):
        batch = data_lib.normalize({"image": source.images[i:i + batch_size],
                                    "label": source.labels[i:i + batch_size]})
        parts.append(np.asarray(encode(state, jnp.asarray(batch["image"]))))
    tokens = np.concatenate(parts).astype(np.int32)
    if jax.process_index() == 0:  # every process computed the same tokens; one file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", tokens=tokens, fingerprint=fingerprint,
                 patch_nums=patch_nums)
        os.replace(path + ".tmp.npz", path)
    return tokens


def per_scale_means(values_BxL, patch_nums) -> jax.Array:
    """(K,) means of a per-token quantity over each scale's tokens."""
    layout = scales.token_layout(patch_nums)
    return jnp.stack([jnp.mean(values_BxL[:, b:e]) for b, e in layout.begin_ends])


def token_metrics(logits_BxLxV, targets_BxL, patch_nums) -> dict:
    ce = var_lib.token_cross_entropy(logits_BxLxV, targets_BxL)
    correct = (jnp.argmax(logits_BxLxV, -1) == targets_BxL).astype(jnp.float32)
    return {"nll": jnp.mean(ce), "acc": jnp.mean(correct),
            "nll_per_scale": per_scale_means(ce, patch_nums),
            "acc_per_scale": per_scale_means(correct, patch_nums)}


def scale_loss_weights(patch_nums, power: float) -> np.ndarray:
    """Weights of the scales' mean token NLLs in the training loss, summing to 1: a token of
    scale k weighs in proportion to (pn_k ** 2) ** -power. power 0 is the official loss (the mean
    over all tokens, so each scale by its token count); power 1 weighs the scales equally."""
    counts = np.asarray([pn * pn for pn in patch_nums], np.float64)
    w = counts ** (1.0 - power)
    return (w / w.sum()).astype(np.float32)


class VARRecipe(loop.RecipeDefaults):
    name = "var"

    def __init__(self, config, tokenizer: VQVAE, token_cache: np.ndarray | None = None):
        self.config = config
        self.token_cache = token_cache
        self.cfg = config.var
        self.model_config = config_lib.var_config(config)
        self.steps = self.cfg.steps
        # The data pipeline's batch: the full sequences' examples, then the coarse prefixes'.
        self.batch_size = self.cfg.batch_size + self.cfg.coarse_batch_size
        self.tokenizer = tokenizer
        self.vq_graphdef, self.vq_state = nnx.split(tokenizer)
        self.patch_nums = self.model_config.patch_nums
        self.scale_weights = scale_loss_weights(self.patch_nums, self.cfg.scale_weight_power)
        self.coarse_patch_nums = tuple(self.patch_nums[:self.cfg.coarse_scales])
        self._eval = None

    def create_model(self, key) -> var_lib.VAR:
        return var_lib.VAR(self.model_config, rngs=nnx.Rngs(params=key))

    def optimizer(self):
        c = self.cfg
        peak = optim.peak_lr(c.base_lr, c.batch_size)
        lr = optim.lin0_schedule(peak, c.steps, c.warmup_steps, wp0=c.wp0, wpe=c.wpe)
        if c.optimizer == "muon":
            muon_lr = optim.lin0_schedule(c.muon_lr, c.steps, c.warmup_steps, wp0=c.wp0,
                                          wpe=c.wpe)
            tx = optim.make_muon_optimizer(lr=lr, muon_lr=muon_lr, b1=c.b1, b2=c.b2,
                                           clip=c.clip, matrix_axes=var_lib.matrix_axes)
            return tx, lr
        wd = optim.wd_schedule(c.twd, c.twde, c.steps)
        tx = optim.make_optimizer(lr=lr, wd=wd, b1=c.b1, b2=c.b2, clip=c.clip,
                                  mask=var_lib.weight_decay_mask)
        return tx, lr

    def frozen(self):
        return {"vq": self.vq_state, "tokens": self.token_cache}

    def tokens(self, frozen, images, index=None):
        """(targets (B, L), teacher-forcing inputs (B, L-1, Cvae)) from the frozen tokenizer, or
        from the token cache when it exists and example indices are given."""
        vq = nnx.merge(self.vq_graphdef, frozen["vq"])
        if index is not None and frozen["tokens"] is not None:
            targets = frozen["tokens"][index]
            indices = targets
        else:
            indices = vq.images_to_indices(images)
            targets = var_lib.flatten_token_maps(indices)
        x = vq.teacher_forcing_inputs(indices)
        return jax.lax.stop_gradient(targets), jax.lax.stop_gradient(x)

    def prepare_batch(self, batch: dict) -> dict:
        """With ``coarse_batch_size``: the pipeline's batch split into the full sequences'
        examples and, under "coarse", the coarse prefixes' (each part then splits over the
        devices on its own)."""
        if not self.cfg.coarse_batch_size:
            return batch
        n = self.cfg.batch_size // jax.process_count()  # this process's full sequences
        full = {k: v[:n] for k, v in batch.items()}
        return {**full, "coarse": {k: v[n:] for k, v in batch.items()}}

    def loss(self, model: var_lib.VAR, frozen, batch, key):
        coarse = batch.get("coarse")
        if coarse is not None:
            key, coarse_key = jax.random.split(key)
        targets, x = self.tokens(frozen, batch["image"], batch.get("index"))
        logits = model(batch["label"], x, deterministic=False, rngs=key)
        m = token_metrics(logits, targets, self.patch_nums)
        nll_per_scale = m["nll_per_scale"]
        metrics = {"nll": m["nll"], "acc": m["acc"], "loss_last": m["nll_per_scale"][-1],
                   "acc_last": m["acc_per_scale"][-1],
                   "loss_per_scale": m["nll_per_scale"], "acc_per_scale": m["acc_per_scale"]}
        if coarse is not None:
            nll_per_scale, metrics["coarse_nll"] = self._with_coarse_prefixes(
                model, frozen, coarse, coarse_key, nll_per_scale)
        return jnp.sum(self.scale_weights * nll_per_scale), metrics

    def _with_coarse_prefixes(self, model, frozen, coarse, key, nll_per_scale):
        """The scales' mean NLLs with the coarse scales' means taken over the full sequences
        and the coarse prefixes together, and the prefixes' own mean token NLL.

        The variety a class's samples lack is lost where the coarse maps are drawn
        (docs/demo_results.md), and those maps are a few tokens of each image: a prefix of the
        first ``coarse_scales`` scales costs a fraction of a full sequence (a sequence of its
        own under the block-causal mask), so they are trained on more examples a step than the
        fine ones. The scales' weights in the loss stay as they are."""
        targets, x = self.tokens(frozen, coarse["image"], coarse.get("index"))
        num = len(self.coarse_patch_nums)
        length = scales.token_layout(self.coarse_patch_nums).seq_len
        logits = model(coarse["label"], x[:, :length - 1], deterministic=False, rngs=key)
        m = token_metrics(logits, targets[:, :length], self.coarse_patch_nums)
        full, extra = self.cfg.batch_size, self.cfg.coarse_batch_size
        mixed = (full * nll_per_scale[:num] + extra * m["nll_per_scale"]) / (full + extra)
        return jnp.concatenate([mixed, nll_per_scale[num:]]), m["nll"]

    # -- evaluation (host side) -----------------------------------------------------------------
    def _eval_data(self):
        if self._eval is None:
            self._eval = tokenizer_recipe.load_eval_images(self.config, self.cfg.eval_examples)
        return self._eval

    def evaluate(self, model: var_lib.VAR, frozen) -> dict:
        images, labels = self._eval_data()
        return evaluate_nll(self, model, frozen, images, labels,
                            self.config.data.eval_batch_size)

    def sample_grid(self, model: var_lib.VAR, frozen, key) -> np.ndarray:
        s = self.config.sample
        num_classes = self.model_config.num_classes
        # The frozen copy lives where the model does (the mesh), unlike self.tokenizer.
        tokenizer = nnx.merge(self.vq_graphdef, frozen["vq"])
        return class_grid(model, tokenizer, num_classes, s.per_class, key, cfg=s.cfg,
                          **sample_options(s))[1]


def evaluate_nll(recipe: VARRecipe, model, frozen, images, labels, batch_size: int) -> dict:
    """Token NLL (nats) and accuracy on held-out images, no label dropout, overall and per
    scale (weighted by batch size so a short last batch counts correctly)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_metrics(state, frozen, images, labels):
        targets, x = recipe.tokens(frozen, images)
        logits = nnx.merge(graphdef, state)(labels, x, deterministic=True)
        return token_metrics(logits, targets, recipe.patch_nums)

    totals, n = None, 0
    for i in range(0, len(images), batch_size):
        m = jax.device_get(batch_metrics(state, frozen, jnp.asarray(images[i:i + batch_size]),
                                         jnp.asarray(labels[i:i + batch_size])))
        b = len(images[i:i + batch_size])
        weighted = jax.tree.map(lambda v, b=b: np.asarray(v) * b, m)
        totals = weighted if totals is None else jax.tree.map(np.add, totals, weighted)
        n += b
    m = jax.tree.map(lambda t: np.asarray(t) / n, totals)
    out = {"token_nll": float(m["nll"]), "token_acc": float(m["acc"])}
    for k in range(len(recipe.patch_nums)):
        out[f"token_nll_scale{k}"] = float(m["nll_per_scale"][k])
        out[f"token_acc_scale{k}"] = float(m["acc_per_scale"][k])
    return out


def sample_options(sample_config) -> dict:
    """The sampler's options of a config's `sample` group, cfg aside (the sweeps vary it)."""
    s = sample_config
    return dict(top_k=s.top_k, top_p=s.top_p, more_smooth=s.more_smooth,
                guidance_power=s.guidance_power)


def class_grid(model, tokenizer, num_classes: int, per_class: int, key, **sample_options
               ) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` samples of each class, one class per row: (images (N, H, W, 3) in [0, 1],
    grid uint8). The same key gives the same grid (in the recipe and in the demo)."""
    return figures.class_grid(
        lambda labels, i: generate(model, tokenizer, labels, jax.random.fold_in(key, i),
                                   **sample_options), range(num_classes), per_class)


def generate(model, tokenizer, labels, key, *, cfg: float, top_k: int, top_p: float,
             more_smooth: bool = False, guidance_power: float = 1.0,
             batch_size: int = 250) -> np.ndarray:
    """Class-conditional samples (N, H, W, 3) in [0, 1], in batches of `batch_size`."""
    from var_jax import sampling

    labels = np.asarray(labels, np.int32)
    out = []
    for i in range(0, len(labels), batch_size):
        chunk = jnp.asarray(labels[i:i + batch_size])
        _, images = sampling.sample(model, tokenizer, chunk, key=jax.random.fold_in(key, i),
                                    cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                                    guidance_power=guidance_power)
        out.append(np.asarray(images))
    return np.concatenate(out)
