"""Convert the official VAR + VQ-VAE checkpoints into a var_jax directory (no torch to read it).

Reads the released ``.pth`` files (torch needed only here, loaded with weights_only=True) or their
``.npz`` exports, infers both architectures from the tensor shapes, maps every key strictly
(missing / unexpected / mis-shaped keys are named), and writes ``config.json`` plus Orbax
checkpoints ``var/`` and ``vqvae/``; ``var_jax.pretrained.load_converted(out)`` reads them back.

  python scripts/convert_checkpoint.py --vae=vae_ch160v4096z32.pth --var=var_d16.pth \
      --out=checkpoints/var_d16
  python scripts/convert_checkpoint.py ... --expect_depth=16   # refuse any other depth
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from var_jax import pretrained
from var_jax.models.var import VARConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("vae", None, "Official VQ-VAE state dict (.pth or .npz).", required=True)
flags.DEFINE_string("var", None, "Official VAR state dict (.pth or .npz).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("expect_depth", None, "Refuse a checkpoint of another depth.")
flags.DEFINE_bool("expect_shared_aln", False, "With --expect_depth: expect shared AdaLN (d36-s).")


def count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv):
    del argv
    start = time.perf_counter()
    expected = None
    if FLAGS.expect_depth is not None:
        expected = VARConfig.official(FLAGS.expect_depth, shared_aln=FLAGS.expect_shared_aln)
    pipe = pretrained.load_official(FLAGS.vae, FLAGS.var, var_config=expected)
    cfg, vae_cfg = pipe.var.config, pipe.vqvae.config
    print(f"VAR: depth {cfg.depth}, width {cfg.width}, heads {cfg.num_heads}, shared AdaLN "
          f"{cfg.shared_aln}, patch_nums {cfg.patch_nums}, vocab {cfg.vocab_size}, "
          f"{count(pipe.var):,} parameters")
    print(f"VQ-VAE: ch {vae_cfg.ch}, ch_mult {vae_cfg.ch_mult}, z {vae_cfg.z_channels}, image "
          f"{vae_cfg.image_size}px, {count(pipe.vqvae):,} parameters")
    out = pipe.save(FLAGS.out)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
