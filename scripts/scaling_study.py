"""The seed paper's claims measured: the n^4 wall, the n^2 escape, the threshold between them.

"On Computational Limits and Provably Efficient Criteria of Visual Autoregressive Models" claims
(1) exact VAR generation costs n^{4+o(1)} in the last side n, (2) with logits bounded below about
log n the polynomial method gives n^{2+o(1)} at 1/poly(n) error, (3) above that nothing
sub-quartic exists. Parts (``--parts``), each writing docs/scaling_<part>.csv and .png:

  time       whole generation (`sampling.Sampler`: transformer over every scale, feature-map
             reconstruction, VQ-VAE decoder) of a small random VAR for geometric schedules of
             last side n, per attention backend; components timed alone on the same shapes:
             attention (every layer's scale-by-scale decode), the decoder, the decoder's own
             attention blocks; rest = total - attention - decoder. Fitted exponents of time in
             n with their fit range, crossover n of each backend with exact, the n where
             attention passes half of exact generation, compiled peak memory.
  threshold  error of poly (degree 2) and favor (fixed features) against exact for L = 680 ...
             39404 and logit bounds b = 0.25 ... 2 ln L, random and adversarial inputs (logits
             filling [-b, b]: aligned and anti-aligned query/key pairs), the smallest rank
             reaching eps = 1/L, and log(rank)/log(L) against b/ln(L) beside `plan`'s rank.
             Head dim D = round(ln L) by default (the paper's d = O(log n)).
  scales     per-scale error e_k of approximate models against exact: teacher forcing (same
             inputs) and sampling (each model draws its own tokens with shared Gumbel noise,
             so a flip at scale k changes every later scale).
  decoder    the VQ-VAE decoder's attention (mid block + lowest level, over n^2 positions) with
             each backend: time and reconstruction error against exact on skimage.data images.

Usage:
  python scripts/scaling_study.py                 # full study on CPU (about an hour, loaded)
  python scripts/scaling_study.py --quick         # minutes: small n, few bounds
  python scripts/scaling_study.py --parts=threshold --out=runs/study
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from var_jax import attention, sampling, scales
from var_jax.attention import poly
from var_jax.models.var import VAR, VARConfig
from var_jax.models.vqvae import VQVAE, VQVAEConfig

FLAGS = flags.FLAGS
PARTS = ("time", "threshold", "scales", "decoder")
flags.DEFINE_string("out", "docs", "Directory of the CSV files and PNG plots.")
flags.DEFINE_bool("quick", False, "A minutes-long run: small n, few bounds, one repeat.")
flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
flags.DEFINE_list("ns", None, "Last sides of the time part (default 8,16,32,64,128; quick "
                  "8,16,32).")
flags.DEFINE_list("backends", list(attention.BACKENDS), "Backends of the time part.")
flags.DEFINE_integer("depth", 2, "VAR depth of the time part.")
flags.DEFINE_integer("width", 64, "VAR width.")
flags.DEFINE_integer("heads", 8, "VAR heads (head dim = width / heads).")
flags.DEFINE_float("max_temperature", 0.25, "VAR temperature clamp = logit bound (auto's b).")
flags.DEFINE_integer("degree", 2, "poly degree in the time and threshold parts.")
flags.DEFINE_integer("num_features", 64, "favor features in the time part.")
flags.DEFINE_integer("threshold_features", 256, "favor features of the fixed-rank threshold "
                     "error.")
flags.DEFINE_integer("batch", 1, "Images per generation (CFG doubles the transformer batch).")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
flags.DEFINE_float("seconds_per_point", 20.0, "Fewer repeats once one call is this slow.")
flags.DEFINE_float("memory_limit_gb", 6.0, "Skip a point whose compiled memory exceeds this.")
flags.DEFINE_list("threshold_ns", None, "Schedule sides of the threshold part (L = 680 ... "
                  "39404: 16,32,64,128; quick 16,32).")
flags.DEFINE_integer("threshold_head_dim", 0, "Head dim of the threshold part (0: round(ln L)).")
flags.DEFINE_integer("rows", 96, "Query rows sampled for float64 errors.")
flags.DEFINE_integer("max_degree", 40, "Largest poly degree of the rank search.")
flags.DEFINE_integer("scales_n", 16, "Last side of the scales part.")
flags.DEFINE_float("scales_bound", 1.0, "VAR temperature clamp (logit bound) of the scales "
                   "part.")
flags.DEFINE_list("time_csv", None, "Rebuild the time summary and plot from these CSVs of "
                  "earlier runs (merged; later files win) instead of measuring.")
flags.DEFINE_integer("seed", 0, "Seed of models, inputs and random features.")
flags.DEFINE_string("compilation_cache", "~/.cache/var_jax/jax_compilation_cache",
                    "Persistent JAX compilation cache (empty: off); reruns skip compiling.")

VOCAB, CVAE = 256, 16


# ---------------------------------------------------------------------------------------------
# Shared helpers.

def compiled_and_peak(fn, *args):
    """(compiled fn, compiled peak bytes: temporaries + arguments + outputs - aliased)."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        m = compiled.memory_analysis()
        peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes)
    except Exception:
        peak = float("nan")
    return compiled, float(peak)


def median_seconds(compiled, *args):
    """Median wall time of ``FLAGS.repeats`` calls after one warm call (fewer when slow)."""
    jax.block_until_ready(compiled(*args))
    times = []
    while len(times) < FLAGS.repeats:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if sum(times) > FLAGS.seconds_per_point:
            break
    return statistics.median(times)


def fit_exponent(ns, ts):
    """Least-squares slope of log t against log n (nan with fewer than 2 finite points)."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts, strict=True)
           if t is not None and np.isfinite(t) and t > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def write_csv(name, rows):
    path = os.path.join(FLAGS.out, f"scaling_{name}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}", flush=True)
    return path


def unit(x, axis=-1):
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def var_qkv(key, batch, seq_len, heads, head_dim, bound):
    """VAR-like attention inputs: q, k L2-normalised, q times the bound; v standard normal."""
    kq, kk, kv = jax.random.split(key, 3)
    shape = (batch, seq_len, heads, head_dim)
    return (bound * unit(jax.random.normal(kq, shape)), unit(jax.random.normal(kk, shape)),
            jax.random.normal(kv, shape))


# ---------------------------------------------------------------------------------------------
# Part 1: time.

def backend_options(backend, head_dim, patch_nums):
    """(backend that runs, its options, label) for a requested backend of the time part."""
    if backend == "poly":
        return "poly", {"degree": FLAGS.degree}, f"poly (degree {FLAGS.degree})"
    if backend == "favor":
        return "favor", {"num_features": FLAGS.num_features}, f"favor ({FLAGS.num_features})"
    if backend == "auto":  # the sampler runs the resolved backend (plan at eps = 1/L)
        name, opts = attention.resolve_auto(FLAGS.max_temperature, head_dim, patch_nums)
        detail = f"degree {opts['degree']}" if name == "poly" else "exact"
        return name, opts, f"auto -> {name} ({detail})"
    return backend, {}, backend


def _numpy_vqvae_state(abstract_state, config, seed):
    """Random VQ-VAE parameters drawn in numpy: kernels N(0, 1/fan_in), norms 1, biases 0, the
    codebook N(0, codebook_init_std^2). Flax's truncated-normal conv initialisers compile one
    XLA program per shape, about a minute per model on the loaded CPU; the study needs random
    weights of sane scale, not that distribution."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias":
            return jnp.zeros(x.shape, x.dtype)
        std = (config.codebook_init_std if name == "embedding"
               else 1.0 / math.sqrt(max(1, int(np.prod(x.shape[:-1])))))
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_state)


def fast_init(cls, config, seed):
    """cls(config, rngs=nnx.Rngs(seed)), built once per config up to its attention backend
    (the parameters do not depend on it); VAR's initialisers run in one jit, the VQ-VAE's are
    drawn in numpy (`_numpy_vqvae_state`)."""
    key = (cls.__name__, dataclasses.replace(config, **{
        f: v for f, v in (("attn_backend", "exact"), ("attn_options", ()),
                          ("decoder_attn_backend", "exact"), ("decoder_attn_options", ()))
        if hasattr(config, f)}), seed)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed))))
    if key not in _STATES:
        if cls is VQVAE:
            _STATES[key] = _numpy_vqvae_state(abstract_state, config, seed)
        else:
            _STATES[key] = jax.jit(lambda: nnx.split(cls(config, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, _STATES[key])


_STATES = {}


def build_models(patch_nums, backend, options):
    n = patch_nums[-1]
    var_cfg = VARConfig(depth=FLAGS.depth, width=FLAGS.width, num_heads=FLAGS.heads,
                        patch_nums=patch_nums, vocab_size=VOCAB, cvae=CVAE, num_classes=10,
                        max_temperature=FLAGS.max_temperature, attn_backend=backend,
                        attn_options=options, attn_seed=FLAGS.seed)
    vae_cfg = VQVAEConfig(image_size=4 * n, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                          z_channels=CVAE, vocab_size=VOCAB, patch_nums=patch_nums)
    return fast_init(VAR, var_cfg, FLAGS.seed), fast_init(VQVAE, vae_cfg, FLAGS.seed + 1)


def generation_fn(var, vae):
    """(var_state, vae_state, key) -> images through `sampling.Sampler` (CFG 1.5, no top-k/p)."""
    var_gd, _ = nnx.split(var)
    vae_gd, _ = nnx.split(vae)
    labels = jnp.arange(FLAGS.batch, dtype=jnp.int32) % 10

    def run(var_state, vae_state, key):
        sampler = sampling.Sampler(nnx.merge(var_gd, var_state), nnx.merge(vae_gd, vae_state))
        return sampler(labels, key, cfg=1.5, top_k=0, top_p=0.0)[1]
    return run


def attention_fn(backend, options, patch_nums, heads, head_dim):
    """One layer's attention over every scale as the sampler runs it (decode state, CFG batch)."""
    layout = scales.token_layout(patch_nums)

    def run(q, k, v, key):
        state = attention.init_decode_state(backend, q.shape[0], heads, head_dim, patch_nums,
                                            rng=key, **options)
        outs = []
        for si, (b, e) in enumerate(layout.begin_ends):
            out, state = attention.decode_scale(state, q[:, b:e], k[:, b:e], v[:, b:e], si,
                                                backend=backend, **options)
            outs.append(out)
        return jnp.concatenate(outs, axis=1)
    return run


def measure(fn, *args):
    """(seconds, peak bytes) or (nan, peak) when the compiled memory is over the limit."""
    compiled, peak = compiled_and_peak(fn, *args)
    if peak > FLAGS.memory_limit_gb * 2 ** 30:
        return float("nan"), peak
    return median_seconds(compiled, *args), peak


def _number(x):
    try:
        return float(x) if x not in ("", None) else float("nan")
    except ValueError:
        return x


def rows_from_csv(paths):
    merged = {}
    for path in paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                r = {k: (_number(v) if k not in ("backend", "runs") else v) for k, v in r.items()}
                r["n"], r["L"] = int(r["n"]), int(r["L"])
                merged[(r["n"], r["backend"])] = r
    return sorted(merged.values(), key=lambda r: (r["n"], FLAGS.backends.index(r["backend"])
                                                  if r["backend"] in FLAGS.backends else 99))


def time_part():
    if FLAGS.time_csv:
        rows = [r for r in rows_from_csv(FLAGS.time_csv) if r["backend"] in FLAGS.backends]
        ns = sorted({r["n"] for r in rows})
        write_csv("time", rows)
        summary = time_summary(rows, ns)
        plot_time(rows, ns, summary)
        return summary
    ns = [int(n) for n in (FLAGS.ns or ([8, 16] if FLAGS.quick else [8, 16, 32, 64, 128]))]
    head_dim = FLAGS.width // FLAGS.heads
    rows = []
    for n in ns:
        patch_nums = scales.geometric_schedule(n)
        seq_len = scales.token_layout(patch_nums).seq_len
        decoder_done, done = None, {}
        for requested in FLAGS.backends:
            backend, options, label = backend_options(requested, head_dim, patch_nums)
            same = done.get((backend, tuple(sorted(options.items()))))
            if same is not None:  # auto resolved to a configuration already measured
                rows.append(dict(same, backend=requested, runs=label))
                write_csv("time", rows)
                continue
            var, vae = build_models(patch_nums, backend, options)
            row = {"n": n, "L": seq_len, "backend": requested, "runs": label}
            _, var_state = nnx.split(var)
            _, vae_state = nnx.split(vae)
            key = jax.random.key(FLAGS.seed)
            row["total_s"], row["total_peak_bytes"] = measure(generation_fn(var, vae),
                                                              var_state, vae_state, key)
            q, k, v = var_qkv(jax.random.key(FLAGS.seed + 2), 2 * FLAGS.batch, seq_len,
                              FLAGS.heads, head_dim, FLAGS.max_temperature)
            t_att, row["attention_peak_bytes"] = measure(
                attention_fn(backend, options, patch_nums, FLAGS.heads, head_dim), q, k, v,
                jax.random.key(FLAGS.seed + 3))
            row["attention_s"] = FLAGS.depth * t_att
            if decoder_done is None:  # the decoder does not depend on the VAR's backend
                f_hat = jax.random.normal(jax.random.key(4), (FLAGS.batch, n, n, CVAE))
                vae_gd = nnx.split(vae)[0]
                t_dec, _ = measure(
                    lambda st, f, gd=vae_gd: nnx.merge(gd, st).decode_features(f), vae_state,
                    f_hat)
                block = vae.decoder.mid.attn_1
                width = block.qkv.in_features
                blocks = 1 + (len(vae.decoder.up[-1].attn))
                h = jax.random.normal(jax.random.key(5), (FLAGS.batch, n, n, width))
                blk_gd = nnx.split(block)[0]
                t_datt, _ = measure(lambda st, x, blk_gd=blk_gd: nnx.merge(blk_gd, st)(x),
                                    nnx.split(block)[1], h)
                decoder_done = (t_dec, blocks * t_datt)
            row["decoder_s"], row["decoder_attention_s"] = decoder_done
            row["rest_s"] = row["total_s"] - row["attention_s"] - row["decoder_s"]
            rows.append(row)
            done[(backend, tuple(sorted(options.items())))] = row
            write_csv("time", rows)  # after every point: a long run keeps what it measured
            print({k: (f"{x:.4g}" if isinstance(x, float) else x) for k, x in row.items()},
                  flush=True)
    summary = time_summary(rows, ns)
    plot_time(rows, ns, summary)
    return summary


def time_summary(rows, ns):
    """Exponents per backend and component over n >= 16 (or all n in quick mode), crossovers."""
    fit_min = ns[0] if FLAGS.quick or len(ns) < 3 else 16
    out = {"fit_range": (fit_min, ns[-1]), "exponents": {}, "crossover": {},
           "attention_dominates_exact": None}
    get = lambda b, col: [next((r[col] for r in rows if r["n"] == n and r["backend"] == b),
                               float("nan")) for n in ns]
    fit_ns = [n for n in ns if n >= fit_min]
    sel = lambda vals: [v for n, v in zip(ns, vals, strict=True) if n >= fit_min]
    for b in FLAGS.backends:
        out["exponents"][b] = {col: fit_exponent(fit_ns, sel(get(b, col)))
                               for col in ("total_s", "attention_s", "rest_s", "decoder_s",
                                           "decoder_attention_s")}
    if "exact" in FLAGS.backends:
        exact_total, exact_att = get("exact", "total_s"), get("exact", "attention_s")
        for n, tot, att in zip(ns, exact_total, exact_att, strict=True):
            if att > 0.5 * tot:
                out["attention_dominates_exact"] = n
                break
        for b in FLAGS.backends:
            if b == "exact":
                continue
            out["crossover"][b] = next((n for n, t, te in zip(ns, get(b, "total_s"),
                                                              exact_total, strict=True)
                                        if t < te), None)
    return out


def plot_time(rows, ns, summary):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in FLAGS.backends:
        pts = [(r["n"], r["total_s"], r["attention_s"]) for r in rows if r["backend"] == b]
        n_, tot, att = zip(*pts, strict=True)
        e = summary["exponents"][b]
        axes[0].loglog(n_, tot, "o-", label=f"{b}: total ~ n^{e['total_s']:.2f}")
        axes[1].loglog(n_, att, "o-", label=f"{b}: attention ~ n^{e['attention_s']:.2f}")
    # The decoder does not depend on the VAR's backend: one point per n, from whichever
    # backend measured it (merged runs may cover different n per backend).
    dec = sorted({r["n"]: (r["decoder_s"], r["decoder_attention_s"]) for r in rows}.items())
    n_ = [n for n, _ in dec]
    d, da = [t for _, (t, _) in dec], [t for _, (_, t) in dec]
    lo, hi = summary["fit_range"]
    fit = [i for i, n in enumerate(n_) if lo <= n <= hi]
    e_d = fit_exponent([n_[i] for i in fit], [d[i] for i in fit])
    e_da = fit_exponent([n_[i] for i in fit], [da[i] for i in fit])
    axes[1].loglog(n_, d, "k--", label=f"VQ-VAE decoder ~ n^{e_d:.2f}")
    axes[1].loglog(n_, da, "k:", label=f"decoder attention ~ n^{e_da:.2f}")
    for ax, title in zip(axes, ("whole generation (Sampler)", "components"), strict=True):
        ax.set_xlabel("last side n")
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}; fits over n = {lo}..{hi}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"VAR depth {FLAGS.depth}, width {FLAGS.width}, {FLAGS.heads} heads, logit "
                 f"bound {FLAGS.max_temperature}, batch {FLAGS.batch} (CFG x2), "
                 f"{jax.devices()[0].platform}")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out, "scaling_time.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Part 3: threshold.

def threshold_inputs(kind, key, patch_nums, head_dim, bound):
    """(q, k, v) of shape (1, L, 1, D). random: VAR-like; adversarial: every query aligned or
    anti-aligned with one direction u and keys at cosines to u filling [-1, 1], so the logits
    fill [-b, b], extremes included (where a fixed-degree polynomial is worst)."""
    seq_len = scales.token_layout(patch_nums).seq_len
    if kind == "random":
        return var_qkv(key, 1, seq_len, 1, head_dim, bound)
    ku, kw, kc, ks, kv = jax.random.split(key, 5)
    u = unit(jax.random.normal(ku, (head_dim,)))
    w = jax.random.normal(kw, (seq_len, head_dim))
    w = unit(w - (w @ u)[:, None] * u[None])  # orthogonal to u
    cos = jax.random.uniform(kc, (seq_len,), minval=-1.0, maxval=1.0)
    k = cos[:, None] * u[None] + jnp.sqrt(1 - cos ** 2)[:, None] * w
    sign = jnp.where(jax.random.bernoulli(ks, 0.5, (seq_len,)), 1.0, -1.0)
    q = bound * sign[:, None] * u[None]
    v = jax.random.normal(kv, (seq_len, head_dim))
    return tuple(x[None, :, None, :] for x in (q, k, v))


def sampled_rows(layout, count, rng):
    """Query rows: the first token and a uniform sample of the rest (most in the large scales)."""
    rows = rng.choice(np.arange(1, layout.seq_len), size=min(count, layout.seq_len - 1),
                      replace=False)
    return np.sort(np.concatenate([[0], rows]))


def visible_end(layout, rows):
    ends = np.array([e for _, e in layout.begin_ends])
    return ends[np.asarray(layout.level_ids)[rows]]


def rows_error(out_rows, ref_rows, v):
    return float(np.abs(np.asarray(out_rows, np.float64) - ref_rows).max() / np.abs(v).max())


class RowProblem:
    """The float64 logits of the sampled rows against their visible keys, for the reference and
    for the polynomial method evaluated exactly: with weights p(q . k) for the Taylor polynomial
    p, the poly backend's output is sum_j p(l_ij) v_j / sum_j p(l_ij) (its features factorise p
    exactly), so the smallest degree reaching eps is found without building 10^5-wide
    features. The backend itself is measured at the fixed degree (`poly_err`)."""

    def __init__(self, q, k, v, layout, rows):
        q, k, v = (np.asarray(x[0, :, 0], np.float64) for x in (q, k, v))
        self.v = v
        ends = visible_end(layout, rows)
        self.mask = np.arange(layout.seq_len)[None, :] < ends[:, None]
        self.logits = np.where(self.mask, q[rows] @ k.T, 0.0)
        ref_w = np.where(self.mask, np.exp(self.logits - self.logits.max(-1, keepdims=True)), 0)
        self.ref = (ref_w @ v) / ref_w.sum(-1, keepdims=True)

    def poly_errors(self, bound, degrees, eps=0.0):
        """{degree: error} of even-degree Taylor polynomials, the better of centres 0 and -b
        (each centre stops at its first degree reaching ``eps``)."""
        out = {}
        for center in (0.0, -bound):
            x = self.logits - center
            term = np.where(self.mask, 1.0, 0.0)
            acc = term.copy()
            for t in range(1, max(degrees) + 1):
                term = term * x / t
                acc = acc + term
                if t in degrees:  # a positive factor e^c cancels in the normalisation
                    den = acc.sum(-1, keepdims=True)
                    err = np.abs((acc @ self.v) / den - self.ref).max() / np.abs(self.v).max()
                    out[t] = min(out.get(t, np.inf), float(err))
                    if err <= eps:
                        break
        return out


def favor_features():
    """favor features tried for eps = 1/L."""
    return [16, 64, 256] if FLAGS.quick else [16, 64, 256, 1024, 4096]


def threshold_part():
    ns = [int(n) for n in (FLAGS.threshold_ns or ([16, 32] if FLAGS.quick else [16, 32, 64, 128]))]
    rng = np.random.default_rng(FLAGS.seed)
    features = favor_features()
    rows_out = []
    for n in ns:
        patch_nums = scales.geometric_schedule(n)
        layout = scales.token_layout(patch_nums)
        seq_len = layout.seq_len
        ln_l = math.log(seq_len)
        head_dim = FLAGS.threshold_head_dim or round(ln_l)
        eps = 1.0 / seq_len
        # Degrees up to the first whose rank exceeds L^3 (no speed-up is left long before).
        degrees = []
        for g in range(2, FLAGS.max_degree + 1, 2):
            degrees.append(g)
            if poly.rank(head_dim, g) > seq_len ** 3:
                break
        grid = [0.25 * 2 ** i for i in range(12) if 0.25 * 2 ** i < 2 * ln_l]
        grid = grid[::2] + [2 * ln_l] if FLAGS.quick else grid + [2 * ln_l]
        rows = sampled_rows(layout, FLAGS.rows, rng)
        poly_fn = jax.jit(lambda q, k, v, pn=patch_nums: attention.block_causal_attention(
            q, k, v, pn, backend="poly", degree=FLAGS.degree))
        favor_fns = {m: jax.jit(lambda q, k, v, key, pn=patch_nums, m=m:
                                attention.block_causal_attention(q, k, v, pn, backend="favor",
                                                                 rng=key, num_features=m))
                     for m in sorted(set(features + [FLAGS.threshold_features]))}
        for bound in grid:
            p = attention.plan(bound, head_dim, seq_len, eps, patch_nums=patch_nums,
                               max_degree=degrees[-1])
            for kind in ("random", "adversarial"):
                key = jax.random.key(FLAGS.seed + 17 * n)
                q, k, v = threshold_inputs(kind, key, patch_nums, head_dim, bound)
                prob = RowProblem(q, k, v, layout, rows)
                errs = prob.poly_errors(bound, degrees, eps)
                min_deg = next((g for g in degrees if errs.get(g, np.inf) <= eps), None)
                fkey = jax.random.key(FLAGS.seed + 1)
                ferr = {m: rows_error(fn(q, k, v, fkey)[0, rows, 0], prob.ref, prob.v)
                        for m, fn in favor_fns.items()
                        if m == FLAGS.threshold_features or m <= max(features)}
                min_m = next((m for m in features if ferr[m] <= eps), None)
                row = {
                    "n": n, "L": seq_len, "D": head_dim, "bound": bound,
                    "b_over_lnL": bound / ln_l, "kind": kind, "eps": eps,
                    f"poly{FLAGS.degree}_err": rows_error(poly_fn(q, k, v)[0, rows, 0],
                                                          prob.ref, prob.v),
                    f"poly{FLAGS.degree}_err_exact_arith": errs.get(FLAGS.degree, float("nan")),
                    f"favor{FLAGS.threshold_features}_err": ferr[FLAGS.threshold_features],
                    f"favor{max(features)}_err": ferr[max(features)],
                    "poly_min_degree": min_deg,
                    "poly_min_rank": poly.rank(head_dim, min_deg) if min_deg else None,
                    "favor_min_features": min_m,
                    "plan_degree": p.degree, "plan_rank": p.rank, "plan_certified": p.certified,
                }
                row["y_poly"] = (math.log(row["poly_min_rank"]) / ln_l if min_deg
                                 else float("nan"))
                row["y_favor"] = math.log(min_m) / ln_l if min_m else float("nan")
                row["y_plan"] = math.log(p.rank) / ln_l if p.certified else float("nan")
                rows_out.append(row)
                print({k_: (f"{x:.3g}" if isinstance(x, float) else x)
                       for k_, x in row.items()}, flush=True)
    write_csv("threshold", rows_out)
    summary = threshold_summary(rows_out)
    plot_threshold(rows_out, summary)
    return summary


def crossing(xs, ys, level=1.0):
    """The x where y first reaches ``level`` (log-linear interpolation), or None."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y0 < level <= y1:
            return x0 + (level - y0) * (x1 - x0) / (y1 - y0)
    return None


def threshold_summary(rows):
    """Per L and input kind: the b / ln L where the smallest certified (plan) and measured poly
    rank reach L (log rank / log L = 1: no speed-up over exact left)."""
    out = {}
    for n in sorted({r["n"] for r in rows}):
        for kind in ("random", "adversarial"):
            sel = [r for r in rows if r["n"] == n and r["kind"] == kind]
            xs = [r["b_over_lnL"] for r in sel]
            # Unreached degrees (rank beyond L^3) count as above the level.
            meas = [r["y_poly"] if np.isfinite(r["y_poly"]) else 3.0 for r in sel]
            plan_y = [r["y_plan"] if np.isfinite(r["y_plan"]) else 3.0 for r in sel]
            out[(n, kind)] = {"L": sel[0]["L"], "measured": crossing(xs, meas),
                              "plan": crossing(xs, plan_y)}
    return out


def plot_threshold(rows, summary):
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ns = sorted({r["n"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(ns):
        c = colors[i % len(colors)]
        for kind, style in (("random", "o-"), ("adversarial", "s--")):
            sel = [r for r in rows if r["n"] == n and r["kind"] == kind]
            x = [r["b_over_lnL"] for r in sel]
            lab = f"L={sel[0]['L']} (D={sel[0]['D']}) {kind}"
            axes[0].plot(x, [r["y_poly"] for r in sel], style, color=c, label=lab)
            axes[1].semilogy([r["bound"] for r in sel], [r[f"poly{FLAGS.degree}_err"]
                             for r in sel], style, color=c, label=f"poly-{FLAGS.degree} {lab}")
            axes[1].semilogy([r["bound"] for r in sel],
                             [r[f"favor{FLAGS.threshold_features}_err"] for r in sel], style,
                             color=c, alpha=0.4)
            axes[2].loglog([r["bound"] for r in sel],
                           [r[f"favor{max(favor_features())}_err"] for r in sel], style, color=c,
                           label=f"{lab}; reaches 1/L at "
                                 f"{sum(np.isfinite(r['y_favor']) for r in sel)} bounds")
        sel = [r for r in rows if r["n"] == n and r["kind"] == "random"]
        axes[0].plot([r["b_over_lnL"] for r in sel], [r["y_plan"] for r in sel], ":", color=c,
                     lw=2.5, label=f"plan, L={sel[0]['L']}")
        axes[1].axhline(1 / sel[0]["L"], color=c, lw=0.8, ls=":")
        axes[2].axhline(1 / sel[0]["L"], color=c, lw=0.8, ls=":")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title("smallest poly rank with error <= 1/L\n(dotted: plan's certified rank; "
                      "y = 1: rank L, no speed-up)", fontsize=9)
    axes[0].set_xlabel("b / ln L")
    axes[0].set_ylabel("log(rank) / log(L)")
    axes[1].set_title(f"error at fixed rank: poly degree {FLAGS.degree} (strong), favor "
                      f"{FLAGS.threshold_features} (faint); dotted 1/L", fontsize=9)
    axes[1].set_xlabel("logit bound b")
    axes[1].set_ylabel("max |out - exact| / max |v|")
    axes[2].set_title(f"favor with {max(favor_features())} features (the most tried); dotted "
                      "1/L", fontsize=9)
    axes[2].set_xlabel("logit bound b")
    axes[2].set_ylabel("max |out - exact| / max |v|")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out, "scaling_threshold.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Part 4: error through the scales.

def scales_models(patch_nums):
    """(name, backend, options) of the approximate models compared with exact."""
    head_dim = FLAGS.width // FLAGS.heads
    seq_len = scales.token_layout(patch_nums).seq_len
    p = attention.plan(FLAGS.scales_bound, head_dim, seq_len, 1.0 / seq_len,
                       patch_nums=patch_nums)
    return [("exact", "exact", {}), (f"poly-{FLAGS.degree}", "poly", {"degree": FLAGS.degree}),
            # The plan's degree whether or not it finds poly cheaper than exact (plan.options
            # is empty when it picks flash): the question here is the error, not the cost.
            (f"poly-{p.degree} (plan, eps=1/L)", "poly", p.poly_options),
            (f"favor-{FLAGS.num_features}", "favor", {"num_features": FLAGS.num_features}),
            ("favor-1024", "favor", {"num_features": 1024})], p


def scales_part():
    n = FLAGS.scales_n
    patch_nums = scales.geometric_schedule(n)
    layout = scales.token_layout(patch_nums)
    models, p = scales_models(patch_nums)
    batch = 4
    labels = jnp.arange(batch, dtype=jnp.int32)
    rng = np.random.default_rng(FLAGS.seed)
    tf_maps = [jnp.asarray(rng.integers(0, VOCAB, (batch, pn, pn)), jnp.int32)
               for pn in patch_nums]
    gumbel = [jax.random.gumbel(jax.random.key(100 + i), (batch, pn * pn, VOCAB))
              for i, pn in enumerate(patch_nums)]
    vae = None
    results = {}
    for name, backend, options in models:
        # Gains of a generic (not near-identity) network, so attention shapes the output: the
        # official init (AdaLN gamma 1e-5, head 0.02) would hide any attention error.
        var_cfg = VARConfig(depth=FLAGS.depth, width=FLAGS.width, num_heads=FLAGS.heads,
                            patch_nums=patch_nums, vocab_size=VOCAB, cvae=CVAE, num_classes=10,
                            max_temperature=FLAGS.scales_bound, attn_backend=backend,
                            attn_options=options, attn_seed=FLAGS.seed, init_alng=1.0,
                            init_head=1.0)
        var = fast_init(VAR, var_cfg, FLAGS.seed)
        if vae is None:
            vae = build_models(patch_nums, "exact", {})[1]
            tf_inputs = jax.jit(vae.teacher_forcing_inputs)
        gd, st = nnx.split(var)
        forward = jax.jit(lambda s, lab, x, gd=gd: nnx.merge(gd, s)(lab, x))
        tf_logits = np.asarray(forward(st, labels, tf_inputs(tf_maps)))
        # Sampling: scale by scale, tokens = argmax(logits + shared Gumbel noise).
        maps = [jnp.zeros((batch, pn, pn), jnp.int32) for pn in patch_nums]
        samp_logits = []
        for si, (b, e) in enumerate(layout.begin_ends):
            logits = forward(st, labels, tf_inputs(maps))[:, b:e]
            samp_logits.append(np.asarray(logits))
            maps[si] = jnp.argmax(logits + gumbel[si], -1).astype(jnp.int32).reshape(
                batch, patch_nums[si], patch_nums[si])
        results[name] = (tf_logits, samp_logits, [np.asarray(m) for m in maps])
    rows = []
    ref_tf, ref_samp, ref_maps = results["exact"]
    for name, (tf_logits, samp_logits, maps) in results.items():
        if name == "exact":
            continue
        for si, (b, e) in enumerate(layout.begin_ends):
            scale_ref = np.abs(ref_tf[:, b:e]).max()
            rows.append({
                "model": name, "scale": si, "side": patch_nums[si],
                "tf_err": float(np.abs(tf_logits[:, b:e] - ref_tf[:, b:e]).max() / scale_ref),
                "sample_logit_err": float(np.abs(samp_logits[si] - ref_samp[si]).max()
                                          / np.abs(ref_samp[si]).max()),
                "sample_flip_rate": float(np.mean(maps[si] != ref_maps[si])),
            })
    write_csv("scales", rows)
    summary = {"plan": p, "growth": {}}
    for name in {r["model"] for r in rows}:
        e = np.array([r["tf_err"] for r in rows if r["model"] == name])
        k = np.arange(len(e))
        ok = e > 0
        # e_k ~ a r^k: the geometric growth of the paper's e_{k+1} <= C (e_k + eps) bound.
        summary["growth"][name] = float(np.exp(np.polyfit(k[ok], np.log(e[ok]), 1)[0])) \
            if ok.sum() > 1 else float("nan")
    plot_scales(rows, summary, patch_nums)
    return summary


def plot_scales(rows, summary, patch_nums):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == name]
        k = [r["scale"] for r in sel]
        axes[0].semilogy(k, [r["tf_err"] for r in sel], "o-",
                         label=f"{name} (x{summary['growth'][name]:.2f} per scale)")
        axes[1].semilogy(k, [max(r["sample_logit_err"], 1e-9) for r in sel], "o-", label=name)
        axes[2].plot(k, [r["sample_flip_rate"] for r in sel], "o-", label=name)
    p = summary["plan"]
    axes[0].axhline(p.predicted_error, color="k", ls=":", lw=1,
                    label=f"plan's per-call attention bound (degree {p.degree})")
    for ax, title, ylabel in zip(axes, (
            "teacher forcing: max |logit error| / max |logit|",
            "sampling: logit error on each model's own tokens", "sampling: token flip rate"),
            ("relative error", "relative error", "fraction of tokens"), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"scale k (sides {patch_nums})")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out, "scaling_scales.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Part 2: the decoder's own attention.

def real_images(size):
    """skimage.data photographs, centre-cropped and resized to size x size, in [-1, 1]."""
    from skimage import data, transform

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)().astype(np.float64) / 255.0
        side = min(img.shape[:2])
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        img = transform.resize(img[top:top + side, left:left + side], (size, size),
                               anti_aliasing=True)
        out.append(img * 2 - 1)
    return jnp.asarray(np.stack(out), jnp.float32)


def decoder_part():
    ns = [8, 16] if FLAGS.quick else [8, 16, 32, 64]
    rows = []
    for n in ns:
        patch_nums = scales.geometric_schedule(n)
        base = build_models(patch_nums, "exact", {})[1].config
        images = real_images(base.image_size)
        f_hat = None
        ref = None
        width = base.ch * base.ch_mult[-1]
        for backend, options in (("exact", {}), ("flash", {}), ("poly", {"degree": 2}),
                                 ("favor", {"num_features": 64}),
                                 ("favor", {"num_features": 256})):
            cfg = base.replace(decoder_attn_backend=backend, decoder_attn_options=options)
            vae = fast_init(VQVAE, cfg, FLAGS.seed + 1)  # same parameters for every backend
            gd, st = nnx.split(vae)
            if f_hat is None:  # the encoder is exact in every variant
                encode = jax.jit(lambda s, x, gd=gd: nnx.merge(gd, s).indices_to_fhat(
                    nnx.merge(gd, s).images_to_indices(x)))
                f_hat = encode(st, images)
            # Unclipped decoder output: decode_features clips to [-1, 1], which hides errors
            # wherever this untrained decoder saturates.
            def dec(s, f, gd=gd):
                m = nnx.merge(gd, s)
                return m.decoder(m.post_quant_conv(f))
            t, _ = measure(dec, st, f_hat)
            recon = np.asarray(jax.jit(dec)(st, f_hat), np.float64)
            if ref is None:
                ref = recon
            rows.append({"n": n, "positions": n * n, "channels": width, "backend": backend,
                         "options": str(options), "decoder_s": t,
                         "rel_err_max": float(np.abs(recon - ref).max() / np.abs(ref).max()),
                         "rel_err_rms": float(np.sqrt(np.mean((recon - ref) ** 2)
                                                      / np.mean(ref ** 2)))})
            print(rows[-1], flush=True)
    write_csv("decoder", rows)
    return rows


# ---------------------------------------------------------------------------------------------

def header():
    d = jax.devices()[0]
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {d.platform} "
            f"{getattr(d, 'device_kind', '')}, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, python "
            f"{platform.python_version()}")


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.parts) - set(PARTS))
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; choose from {PARTS}")
    for b in FLAGS.backends:
        if b not in attention.BACKENDS:
            raise app.UsageError(f"--backends: {b!r} is not one of {attention.BACKENDS}")
    if FLAGS.quick:
        if not FLAGS["backends"].present:
            FLAGS.backends = ["exact", "poly", "favor"]
        FLAGS.repeats = min(FLAGS.repeats, 2)
        FLAGS.rows = min(FLAGS.rows, 48)
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser(FLAGS.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    print(header(), flush=True)
    if "time" in FLAGS.parts:
        s = time_part()
        lo, hi = s["fit_range"]
        print(f"\nfitted exponents of time in n over n = {lo}..{hi}:")
        for b, e in s["exponents"].items():
            print(f"  {b:6s} " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in e.items()))
        print(f"  crossover n with exact: {s['crossover']}; attention > half of exact "
              f"generation from n = {s['attention_dominates_exact']}", flush=True)
    if "threshold" in FLAGS.parts:
        s = threshold_part()
        print("\nb / ln L where log(rank)/log(L) reaches 1 (measured poly; plan):")
        for (_, kind), v in s.items():
            print(f"  L={v['L']:6d} {kind:11s} measured {v['measured']}, plan {v['plan']}")
    if "scales" in FLAGS.parts:
        s = scales_part()
        print(f"\nper-scale teacher-forcing error growth factors: {s['growth']}", flush=True)
    if "decoder" in FLAGS.parts:
        decoder_part()


if __name__ == "__main__":
    app.run(main)
