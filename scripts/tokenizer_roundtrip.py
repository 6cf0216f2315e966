"""Encode -> decode real photographs with the multi-scale VQ-VAE and report error and code usage.

Without --checkpoint the tokenizer has RANDOM weights (a CPU-sized config on the official 256px
schedule): the run then checks the pipeline end to end (shapes, jit, token statistics), and the
reconstruction error says nothing about quality. With --checkpoint (an official VQ-VAE state
dict, .pth or .npz) the architecture is read from the checkpoint.

    python scripts/tokenizer_roundtrip.py
    python scripts/tokenizer_roundtrip.py --checkpoint=vae_ch160v4096z32.pth --output=rt.png
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from var_jax import quantizer, scales
from var_jax.convert.common import load_state_dict_file
from var_jax.convert.vqvae import vqvae_config_from_state_dict, vqvae_from_state_dict
from var_jax.models import vqvae

flags.DEFINE_string("checkpoint", None, "official VQ-VAE state dict (.pth or .npz)")
flags.DEFINE_enum("config", "tiny256", ["tiny256", "released"],
                  "architecture for random weights (ignored with --checkpoint)")
flags.DEFINE_enum("pn", "256", sorted(scales.SCHEDULES), "scale schedule (sets the image side)")
flags.DEFINE_list("images", ["astronaut", "coffee", "chelsea", "rocket"],
                  "scikit-image sample images (skimage.data names)")
flags.DEFINE_integer("seed", 0, "seed of the random weights")
flags.DEFINE_string("output", None, "optional PNG: originals above reconstructions")
FLAGS = flags.FLAGS


def load_images(names, side):
    """skimage.data photographs, centre-cropped to a square, resized to side, in [-1, 1]."""
    import skimage.data

    out = []
    for name in names:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except AttributeError as err:
            raise app.UsageError(f"skimage.data has no image {name!r}") from err
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = image[..., :3]
        h, w = image.shape[:2]
        s = min(h, w)
        image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        image = Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS)
        out.append(np.asarray(image, np.float32) / 127.5 - 1.0)
    return jnp.asarray(np.stack(out))


def build_model():
    patch_nums = scales.SCHEDULES[FLAGS.pn]
    if FLAGS.checkpoint:
        state_dict = load_state_dict_file(FLAGS.checkpoint)
        config = vqvae_config_from_state_dict(state_dict, patch_nums)
        return vqvae_from_state_dict(config, state_dict), "checkpoint " + FLAGS.checkpoint
    make = vqvae.VQVAEConfig.released if FLAGS.config == "released" else vqvae.VQVAEConfig.tiny256
    config = make(patch_nums=patch_nums, image_size=16 * patch_nums[-1])
    rngs = nnx.Rngs(jax.random.key(FLAGS.seed, impl="rbg"))
    return vqvae.VQVAE(config, rngs=rngs), f"RANDOM weights ({FLAGS.config}, seed {FLAGS.seed})"


def main(argv):
    del argv
    model, origin = build_model()
    cfg = model.config
    images = load_images(FLAGS.images, cfg.image_size)
    print(f"tokenizer: {origin}; ch={cfg.ch} ch_mult={cfg.ch_mult} V={cfg.vocab_size} "
          f"C={cfg.z_channels}; {len(FLAGS.images)} images {cfg.image_size}px; "
          f"patch_nums={cfg.patch_nums}")

    @nnx.jit
    def roundtrip(model, images):
        f = model.encode_features(images)
        indices, f_hat = model.features_to_indices(f)
        return indices, model.decode_features(f_hat), jnp.mean((f_hat - f) ** 2) / jnp.mean(f * f)

    start = time.perf_counter()
    indices, recon, rel_latent_err = jax.block_until_ready(roundtrip(model, images))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(roundtrip(model, images))
    print(f"jitted encode+decode: {first:.1f} s first call (compile), "
          f"{time.perf_counter() - start:.2f} s second call")

    mse = np.mean((np.asarray(recon) - np.asarray(images)) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(4.0 / np.maximum(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]
    baseline = np.mean(np.asarray(images) ** 2, axis=(1, 2, 3))
    print(f"relative latent error |f_hat - f|^2 / |f|^2: {float(rel_latent_err):.4f}")
    print("image           MSE([-1,1])  PSNR(dB)  MSE of an all-grey guess")
    for name, m, p, b in zip(FLAGS.images, mse, psnr, baseline, strict=True):
        print(f"{name:15s} {m:11.4f} {p:9.2f} {b:11.4f}")

    hits = np.asarray(quantizer.index_hits(indices, cfg.vocab_size, cfg.patch_nums))
    print("scale  pn  tokens  distinct codes  vocab used  perplexity")
    for k, (pn, row) in enumerate(zip(cfg.patch_nums, hits, strict=True)):
        p = row[row > 0] / row.sum()
        print(f"{k:5d} {pn:3d} {row.sum():7d} {int((row > 0).sum()):15d} "
              f"{(row > 0).mean():10.2%} {float(np.exp(-(p * np.log(p)).sum())):11.1f}")
    total = hits.sum(0)
    print(f"all scales: {int((total > 0).sum())} distinct codes of {cfg.vocab_size} "
          f"({(total > 0).mean():.2%})")
    if origin.startswith("RANDOM"):
        print("NOTE: random weights -- the reconstruction error is not a quality measure.")

    if FLAGS.output:
        grid = np.concatenate([np.concatenate(list(np.asarray(x)), axis=1)
                               for x in (images, recon)], axis=0)
        Image.fromarray(np.uint8(np.clip((grid + 1) * 127.5, 0, 255).round())).save(FLAGS.output)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
