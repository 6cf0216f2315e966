"""Sampling latency and throughput of a VAR with real random weights (compile excluded).

The whole next-scale generation (10 scales x depth blocks, CFG doubled batch, top-k/top-p,
VQ-VAE decoding) is one jitted function (`var_jax.sampling.Sampler`); this script times it at
each batch size as the median of --repeats calls, each with a fresh key, after a warm-up call
that compiles. Weights are drawn by the real initialisers (inside one jit, so a d16 initialises
in seconds on a GPU), in --dtype for parameters and activations.

  python scripts/bench_sampling.py                                  # d16, bf16, batch 1 and 64
  python scripts/bench_sampling.py --depth=2 --vae=tiny256 --batch_sizes=1,4 --dtype=float32
  python scripts/bench_sampling.py --depth=16 --vae=tiny256 --batch_sizes=1 --dtype=float32 \
      --scan_layers=false --compilation_cache=false     # compile time of the looped layout
  python scripts/bench_sampling.py --depth=16 --vae=tiny256 --batch_sizes=1 --dtype=float32 \
      --scale_buckets --compilation_cache=false         # the scales in buckets

"compile" is the first call minus the median steady call. ``--parts`` also times the VQ-VAE
decoder alone on a final feature map, so the transformer's share is the difference.

Reference (official PyTorch, H100, bf16 autocast, d16, cfg 1.5, top-k 900, top-p 0.96):
212 ms at batch 1, 538 ms (119 images/s) at batch 64.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from var_jax import attention, compile_cache, sampling, scales
from var_jax.models.var import VAR, VARConfig
from var_jax.models.vqvae import VQVAE, VQVAEConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("depth", 16, "VAR depth (width 64 * depth, heads = depth).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameters and activations.")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes (images per call).")
flags.DEFINE_integer("repeats", 10, "Timed calls per batch size (median reported).")
flags.DEFINE_enum("vae", "released", ["released", "tiny256"], "VQ-VAE size (random weights).")
flags.DEFINE_enum("attn_backend", "exact", list(attention.BACKENDS),
                  "Attention backend of the decode state.")
flags.DEFINE_bool("scan_layers", True, "Stacked blocks under one scan (False: Python loop).")
flags.DEFINE_bool("parts", False, "Also time the VQ-VAE decoder alone.")
flags.DEFINE_bool("scale_buckets", False, "Scales in buckets of one compiled step each "
                  "(sampling.Sampler; scanned layout, exact or flash).")
compile_cache.define_flag()
flags.DEFINE_float("cfg", 1.5, "Guidance scale.")
flags.DEFINE_integer("top_k", 900, "Top-k (0 = off).")
flags.DEFINE_float("top_p", 0.96, "Top-p (0 = off).")
flags.DEFINE_bool("more_smooth", False, "Gumbel-softmax mixing.")
flags.DEFINE_string("schedule", "256", "Key of scales.SCHEDULES.")


def build(depth, dtype, vae_kind, backend, schedule, scan_layers=True):
    patch_nums = scales.SCHEDULES[schedule]
    var_cfg = VARConfig.official(depth, patch_nums=patch_nums, dtype=dtype, param_dtype=dtype,
                                 attn_backend=backend, scan_layers=scan_layers)
    vae_cfg = (VQVAEConfig.released(patch_nums) if vae_kind == "released"
               else VQVAEConfig.tiny256(patch_nums=patch_nums,
                                        image_size=16 * patch_nums[-1]))
    # Real random init, compiled once instead of run op by op.
    var = nnx.jit(lambda: VAR(var_cfg, rngs=nnx.Rngs(0)))()
    vae = nnx.jit(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(1)))()
    if dtype != "float32":
        graphdef, state = nnx.split(vae)
        state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                             else x, state)
        vae = nnx.merge(graphdef, state)
    return var, vae


def time_decoder(vae, batch, repeats):
    """Median seconds of the VQ-VAE decoder alone on a (B, n, n, Cvae) feature map, compiled
    as the sampler compiles it."""
    graphdef, state = nnx.split(vae)
    decode = functools.partial(sampling.decode_images, graphdef)
    side, channels = vae.config.patch_nums[-1], vae.config.z_channels
    f_hat = jax.random.normal(jax.random.key(0), (batch, side, side, channels), jnp.float32)
    jax.block_until_ready(decode(state, f_hat))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(decode(state, f_hat))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    cache = compile_cache.enable(FLAGS.compilation_cache)
    var, vae = build(FLAGS.depth, FLAGS.dtype, FLAGS.vae, FLAGS.attn_backend, FLAGS.schedule,
                     FLAGS.scan_layers)
    sampler = sampling.Sampler(var, vae, scale_buckets=FLAGS.scale_buckets)
    num_classes = var.config.num_classes
    layout = "scanned" if FLAGS.scan_layers else "looped"
    if sampler.buckets:
        layout += f", scales in {len(sampler.buckets)} buckets"
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, python "
          f"{platform.python_version()}; VAR d{FLAGS.depth} {FLAGS.dtype} ({layout} blocks), "
          f"{FLAGS.attn_backend} attention, VQ-VAE {FLAGS.vae}; compilation cache "
          f"{cache or 'off'}", flush=True)
    results = []
    for batch in [int(b) for b in FLAGS.batch_sizes]:
        labels = jnp.arange(batch) % num_classes
        opts = dict(cfg=FLAGS.cfg, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                    more_smooth=FLAGS.more_smooth)
        start = time.perf_counter()
        jax.block_until_ready(sampler(labels, jax.random.key(0), **opts))
        compile_s = time.perf_counter() - start
        times = []
        for rep in range(FLAGS.repeats):
            key = jax.random.key(rep + 1)
            start = time.perf_counter()
            jax.block_until_ready(sampler(labels, key, **opts))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        row = dict(batch=batch, median_ms=round(1e3 * median, 2),
                   min_ms=round(1e3 * min(times), 2), images_per_s=round(batch / median, 1),
                   first_call_s=round(compile_s, 2), compile_s=round(compile_s - median, 2),
                   depth=FLAGS.depth, dtype=FLAGS.dtype, backend=FLAGS.attn_backend,
                   layout=layout, device=jax.devices()[0].device_kind)
        extra = ""
        if FLAGS.parts:
            decoder_s = time_decoder(vae, batch, FLAGS.repeats)
            row["decoder_ms"] = round(1e3 * decoder_s, 2)
            row["transformer_ms"] = round(1e3 * (median - decoder_s), 2)
            extra = (f"; decoder {row['decoder_ms']:.1f} ms, rest (transformer, quantizer) "
                     f"{row['transformer_ms']:.1f} ms")
        results.append(row)
        print(f"batch {batch:4d}: median {row['median_ms']:9.2f} ms  (min {row['min_ms']:.2f}), "
              f"{row['images_per_s']:8.1f} images/s, first call {compile_s:.1f} s, compile "
              f"{row['compile_s']:.1f} s{extra}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
