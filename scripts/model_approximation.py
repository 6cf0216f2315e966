"""Error of the low-rank attention backends inside a whole VAR model, against attention.plan.

For each temperature clamp s (``VARConfig.max_temperature``; every head's temperature set to s, so
the logit bound b = s is attained) a random-weight model runs teacher forcing with the exact
backend and with "poly" (Taylor degrees 2 and 4, centre from plan) and "favor" (random features).
Reported per row: the plan's bound on one attention layer's output error (relative to max|v|), the
measured error of layer 0's attention output on the model's own q, k, v (relative to max|v|), and
the error of the model's logits (max abs, and relative to max |logits|).

  python scripts/model_approximation.py                  # prints a markdown table
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from var_jax import attention
from var_jax.attention import poly
from var_jax.models.var import VAR, VARConfig

FLAGS = flags.FLAGS
flags.DEFINE_list("temperatures", ["0.5", "1", "2", "4"], "Temperature clamps s (logit bounds).")
flags.DEFINE_list("degrees", ["2", "4"], "Polynomial degrees.")
flags.DEFINE_integer("num_features", 256, "FAVOR+ random features.")
flags.DEFINE_integer("seed", 0, "Seed of weights and inputs.")


def random_state(config, seed):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VAR(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(x):
        std = 1 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else 0.3
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    return graphdef, jax.tree.map(draw, state)


def with_backend(config, state, backend, options):
    cfg = dataclasses.replace(config, attn_backend=backend, attn_options=options)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


def main(argv):
    del argv
    base = VARConfig(depth=2, width=64, num_heads=4, patch_nums=(1, 2, 3, 4, 6, 8),
                     vocab_size=256, cvae=16, num_classes=10)
    _, state = random_state(base, FLAGS.seed)
    key = jax.random.key(FLAGS.seed)
    labels = jnp.array([1, 7])
    x = jax.random.normal(key, (2, base.seq_len - 1, base.cvae))
    h = jax.random.normal(jax.random.fold_in(key, 1), (2, base.seq_len, base.width))
    forward = nnx.jit(lambda m, lab, inp: m(lab, inp))
    print(f"model: depth {base.depth}, width {base.width}, heads {base.num_heads} (head dim "
          f"{base.head_dim}), L = {base.seq_len}, random weights, batch 2\n")
    print("| s (logit bound) | backend | plan bound (attn, rel. max abs v) | measured attn "
          "error (layer 0) | logits max abs error | relative to max abs logits |")
    print("|---|---|---|---|---|---|")
    plans = []
    for s in (float(t) for t in FLAGS.temperatures):
        p = attention.plan(s, base.head_dim, base.seq_len, 1e-3, patch_nums=base.patch_nums)
        plans.append(f"| {s:g} | {p.backend} | {p.degree} | {p.rank} | {p.certified} | "
                     f"{p.predicted_error:.2e} |")
        cfg = dataclasses.replace(base, max_temperature=s)
        st = jax.tree.map(lambda a: a, state)
        for blk in st["blocks"].values():
            blk["attn"]["scale_mul"] = nnx.Param(jnp.full_like(blk["attn"]["scale_mul"][...],
                                                               math.log(s) + 1.0))
        exact_model = with_backend(cfg, st, "exact", {})
        ref = np.asarray(forward(exact_model, labels, x))
        q, k, v = exact_model.blocks[0].attn.qkv(h)
        att_ref = np.asarray(attention.block_causal_attention(q, k, v, cfg.patch_nums))
        vmax = float(jnp.max(jnp.abs(v)))
        rows = []
        for g in (int(d) for d in FLAGS.degrees):
            bounds = {0.0: poly.taylor_error_bound(g, s, 0.0),
                      -s: poly.taylor_error_bound(g, s, -s)}
            center = min(bounds, key=bounds.get)
            entry = bounds[center]
            predicted = 2 * entry / (1 - entry) if entry < 1 else math.inf
            opts = {"degree": g, "center": center}
            rows.append((f"poly g={g} (rank {poly.rank(cfg.head_dim, g)})", opts, "poly",
                         f"{predicted:.2e}"))
        rows.append((f"favor m={FLAGS.num_features}", {"num_features": FLAGS.num_features},
                     "favor", "none (random)"))
        for name, opts, backend, predicted in rows:
            model = with_backend(cfg, st, backend, opts)
            out = np.asarray(forward(model, labels, x))
            att = np.asarray(attention.block_causal_attention(
                q, k, v, cfg.patch_nums, backend=backend,
                rng=exact_model.blocks[0].attn.attn_rng(), **opts))
            att_err = float(np.max(np.abs(att - att_ref))) / vmax
            err = float(np.max(np.abs(out - ref)))
            print(f"| {s:g} | {name} | {predicted} | {att_err:.2e} | {err:.2e} | "
                  f"{err / float(np.max(np.abs(ref))):.2e} |", flush=True)
    print("\nattention.plan(s, head_dim, L, eps=1e-3):\n")
    print("| s | backend | degree | rank | certified | predicted error |")
    print("|---|---|---|---|---|---|")
    print("\n".join(plans))


if __name__ == "__main__":
    app.run(main)
