"""Tokenizer (multi-scale VQ-VAE) training on the generic loop.

Loss: l1_weight * L1 + l2_weight * MSE between the image and the decoder output, plus
vq_weight * the multi-scale VQ loss of var_jax.quantizer.quantize (beta = VQVAEConfig.beta,
0.25, straight-through gradients). Codebook usage is tracked per scale as an exponential moving
average of code hits; every `dead_code_every` steps the codes whose average hits over all
scales fall below `dead_code_threshold` are re-seeded from random encoder output vectors of the
current batch. Evaluation reports reconstruction PSNR and per-scale code usage on held-out data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import data as data_lib
from var_jax import quantizer, xla_options
from var_jax.evaluate.figures import tile as image_grid
from var_jax.models.vqvae import VQVAE
from var_jax.train import config as config_lib
from var_jax.train import loop, optim


class Usage(nnx.Variable):
    """Non-trainable per-scale code-hit statistics (kept in checkpoints, not optimised)."""


class TokenizerTrainModel(nnx.Module):
    """The VQ-VAE plus its training-only usage statistics (K, V)."""

    def __init__(self, vqvae: VQVAE):
        self.vqvae = vqvae
        k, v = len(vqvae.config.patch_nums), vqvae.config.vocab_size
        self.usage = Usage(jnp.ones((k, v), jnp.float32))


def psnr_from_mse(mse_01):
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse_01, 1e-12))


def load_eval_images(config, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` held-out images (B, H, W, 3) in [-1, 1] and labels, in a fixed order."""
    source = data_lib.make_source(config.data, "test")
    ds = data_lib.make_dataset(source, batch_size=config.data.eval_batch_size, seed=0,
                               train=False, image_size=config.data.image_size)
    images, labels, n = [], [], 0
    for batch in ds:
        images.append(batch["image"])
        labels.append(batch["label"])
        n += len(batch["label"])
        if num and n >= num:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return (images[:num], labels[:num]) if num else (images, labels)


class TokenizerRecipe(loop.RecipeDefaults):
    name = "tokenizer"

    def __init__(self, config):
        self.config = config
        self.cfg = config.tokenizer
        self.model_config = config_lib.vqvae_config(config)
        self.steps = self.cfg.steps
        self.batch_size = self.cfg.batch_size
        self._eval = None

    def create_model(self, key) -> TokenizerTrainModel:
        return TokenizerTrainModel(VQVAE(self.model_config, rngs=nnx.Rngs(params=key)))

    def compiler_options(self) -> tuple:
        """A convolutional model, trained in float32: on a CPU its step compiles with XLA's own
        convolutions (:mod:`var_jax.xla_options`)."""
        return xla_options.convolution_options([jnp.float32])

    def optimizer(self):
        c = self.cfg
        lr = optim.lin0_schedule(c.lr, c.steps, c.warmup_steps, wpe=c.wpe)
        tx = optim.make_optimizer(lr=lr, wd=c.weight_decay, b1=c.b1, b2=c.b2, clip=c.clip)
        return tx, lr

    def loss(self, model: TokenizerTrainModel, frozen, batch, key):
        c = self.cfg
        images = batch["image"]
        out = model.vqvae(images)
        diff = out.reconstruction - images
        l1, l2 = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
        loss = c.l1_weight * l1 + c.l2_weight * l2 + c.vq_weight * out.vq_loss
        hits = out.hits_KxV.astype(jnp.float32)
        model.usage[...] = c.usage_decay * model.usage[...] + (1 - c.usage_decay) * hits
        recon = jnp.clip(out.reconstruction, -1, 1)
        mse01 = jnp.mean(jnp.square(recon - images), axis=(1, 2, 3)) / 4.0
        metrics = {"l1": l1, "l2": l2, "vq": out.vq_loss, "psnr": jnp.mean(psnr_from_mse(mse01)),
                   "vq_per_scale": out.vq_loss_per_scale,
                   "batch_usage": jnp.mean(out.hits_KxV > 0),
                   "_f": jax.lax.stop_gradient(out.f)}
        return loss, metrics

    def post_update(self, model: TokenizerTrainModel, frozen, metrics, key):
        """Re-seeds dead codes (every dead_code_every steps) from this batch's encoder outputs."""
        c = self.cfg
        usage = model.usage[...]
        dead = jnp.sum(usage, axis=0) < c.dead_code_threshold
        if c.dead_code_every <= 0:
            return {"dead_codes": jnp.sum(dead).astype(jnp.float32)}
        step = metrics["_step"]
        f = metrics["_f"]
        vectors = f.reshape(-1, f.shape[-1])
        pick = jax.random.randint(key, (usage.shape[1],), 0, vectors.shape[0])
        noise = 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (usage.shape[1],
                                                                         f.shape[-1]))
        fresh = vectors[pick] + noise
        reseed = dead & (step % c.dead_code_every == 0)
        codebook = model.vqvae.quantize.embedding
        codebook[...] = jnp.where(reseed[:, None], fresh, codebook[...])
        # A re-seeded code gets a grace period before it can be called dead again.
        model.usage[...] = jnp.where(reseed[None, :], 1.0, usage)
        return {"dead_codes": jnp.sum(dead).astype(jnp.float32),
                "reseeded": jnp.sum(reseed).astype(jnp.float32)}

    # -- evaluation (host side) -----------------------------------------------------------------
    def _eval_data(self):
        if self._eval is None:
            self._eval = load_eval_images(self.config, self.cfg.eval_examples)
        return self._eval

    def evaluate(self, model: TokenizerTrainModel, frozen) -> dict:
        return evaluate_tokenizer(model.vqvae, self._eval_data()[0],
                                  self.config.data.eval_batch_size)

    def sample_grid(self, model: TokenizerTrainModel, frozen, key) -> np.ndarray:
        """Row 1: held-out originals; row 2: their reconstructions."""
        # One evaluation-sized batch, so the evaluation's compiled function is reused.
        images = self._eval_data()[0][:self.config.data.eval_batch_size]
        recon = np.asarray(_eval_batch(model.vqvae, jnp.asarray(images))[3])
        n = min(8, len(images))
        return image_grid(np.concatenate([images[:n], recon[:n]]), rows=2, value_range=(-1, 1))


@functools.lru_cache(maxsize=8)
def _eval_program(graphdef, options: tuple):
    def run(state, images):
        vqvae = nnx.merge(graphdef, state)
        f = vqvae.encode_features(images)
        indices, f_hat = vqvae.features_to_indices(f)
        recon = vqvae.decode_features(f_hat)
        mse01 = jnp.mean(jnp.square(recon - images), axis=(1, 2, 3)) / 4.0
        hits = quantizer.index_hits(indices, vqvae.config.vocab_size, vqvae.config.patch_nums)
        return psnr_from_mse(mse01), mse01, hits, recon

    return xla_options.jit(run, options)


def _eval_batch(vqvae: VQVAE, images):
    """(PSNR, MSE per image, code hits per scale, reconstructions) of one batch, compiled once
    per model and shape with the convolution options of :mod:`var_jax.xla_options` (a CPU,
    float32 weights: XLA's own convolutions, about 1.7x faster here than YNNPACK's)."""
    graphdef, state = nnx.split(vqvae)
    return _eval_program(graphdef, xla_options.convolution_options_for(state))(state, images)


def evaluate_tokenizer(vqvae: VQVAE, images: np.ndarray, batch_size: int) -> dict:
    """Mean per-image PSNR (images in [0, 1] scale), MSE, and code usage per scale."""
    psnrs, mses, hits = [], [], 0
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        p, m, h, _ = _eval_batch(vqvae, jnp.asarray(chunk))
        psnrs.append(np.asarray(p))
        mses.append(np.asarray(m))
        hits = hits + np.asarray(h)
    usage = quantizer.code_usage(hits)
    out = {"psnr": float(np.mean(np.concatenate(psnrs))),
           "mse": float(np.mean(np.concatenate(mses))),
           "code_usage_mean": float(np.mean(usage)),
           "code_usage_all_scales": float(np.mean(hits.sum(0) > 0))}
    for k, u in enumerate(usage):
        out[f"code_usage_scale{k}"] = float(u)
    return out
