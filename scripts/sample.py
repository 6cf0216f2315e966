"""Sample a class grid from a VAR checkpoint and write it as one PNG.

--checkpoint is a converted directory (scripts/convert_checkpoint.py, or
``pretrained.Pipeline(var, vqvae).save(dir)`` after training); --vae/--var read the official
files directly. One row per class, --per_class images per row; batches of --batch_size run through
one jitted sampler, with a progress line per batch.

  python scripts/sample.py --checkpoint=checkpoints/var_d16 --classes=207,360,387,974,88,979 \
      --per_class=8 --cfg=4 --out=grid.png
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from var_jax import attention, compile_cache, pretrained
from var_jax.evaluate import figures

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory.")
flags.DEFINE_string("vae", None, "Official VQ-VAE file (with --var, instead of --checkpoint).")
flags.DEFINE_string("var", None, "Official VAR file (with --vae).")
flags.DEFINE_list("classes", ["0", "1", "2", "3"], "Class ids, one grid row each.")
flags.DEFINE_integer("per_class", 4, "Images per class (grid columns).")
flags.DEFINE_integer("batch_size", 16, "Images per sampler call.")
flags.DEFINE_integer("seed", 0, "Seed; batch i uses seed + i.")
flags.DEFINE_float("cfg", 1.5, "Classifier-free guidance scale (ramped over the scales).")
flags.DEFINE_float("guidance_power", 1.0, "Shape of the ramp: guidance cfg * (k / (K - 1)) ** "
                   "power at scale k; 1 is the official linear ramp.")
flags.DEFINE_integer("top_k", 900, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 0.96, "Top-p filter (0 = off).")
flags.DEFINE_bool("more_smooth", False, "Gumbel-softmax mixing of the codes.")
flags.DEFINE_enum("attn_backend", None, list(attention.BACKENDS),
                  "Override the attention backend (auto: the plan's choice for the model's "
                  "logit bound).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activations and parameters.")
flags.DEFINE_string("out", "samples.png", "Output PNG.")
flags.DEFINE_bool("scale_buckets", False, "Scales in buckets: a faster first call, slower "
                  "calls after it (sampling.Sampler; scanned layout, exact or flash).")
compile_cache.define_flag()


def load():
    if FLAGS.checkpoint:
        return pretrained.load_converted(FLAGS.checkpoint, attn_backend=FLAGS.attn_backend,
                                         dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    if not (FLAGS.vae and FLAGS.var):
        raise app.UsageError("give --checkpoint, or both --vae and --var")
    return pretrained.load_official(FLAGS.vae, FLAGS.var,
                                    attn_backend=FLAGS.attn_backend or "exact",
                                    dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)


def main(argv):
    del argv
    compile_cache.enable(FLAGS.compilation_cache)
    pipe = load()
    if FLAGS.scale_buckets:
        pipe = pretrained.Pipeline(pipe.var, pipe.vqvae, scale_buckets=True)
    classes = [int(c) for c in FLAGS.classes]
    num_batches = -(-len(classes) * FLAGS.per_class // FLAGS.batch_size)

    def sample_batch(labels, i):
        start = time.perf_counter()
        out = pipe.sample(labels, seed=FLAGS.seed + i, cfg=FLAGS.cfg, top_k=FLAGS.top_k,
                          top_p=FLAGS.top_p, more_smooth=FLAGS.more_smooth,
                          guidance_power=FLAGS.guidance_power)
        out = np.asarray(jax.device_get(out), np.float32)
        print(f"batch {i + 1}/{num_batches}: {len(labels)} images in "
              f"{time.perf_counter() - start:.2f} s", flush=True)
        return out

    _, grid = figures.class_grid(sample_batch, classes, FLAGS.per_class, FLAGS.batch_size)
    Image.fromarray(grid).save(FLAGS.out)
    print(f"wrote {FLAGS.out} ({len(classes)} x {FLAGS.per_class} images)")


if __name__ == "__main__":
    app.run(main)
