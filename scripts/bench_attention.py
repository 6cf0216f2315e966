"""Time and error of every block-causal attention backend against the token count L.

Three sweeps, written as CSV and PNG to --out and printed as tables:
1. time (median of repeats, compile excluded), compiled peak memory and error (against a float64
   reference on sampled query rows) of every backend for geometric schedules n = min_n..max_n;
2. error against the logit bound at fixed rank (poly degree 2, favor with as many features);
3. error against the polynomial degree / number of random features at a fixed bound.

Inputs imitate VAR's attention: q and k L2-normalised, q times the temperature (--logit_bound), so
every logit lies in [-bound, bound]. On a GPU with --dtype=bfloat16 the "flash" backend is the
per-scale cuDNN call and "dense_full" one unmasked cuDNN call over all L tokens (more work than
block-causal attention needs: a lower bound on what a single fused call costs).

  python scripts/bench_attention.py                       # CPU defaults, n = 16..128
  python scripts/bench_attention.py --dtype=bfloat16 --max_n=256 --out=runs/bench   # GPU
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from var_jax import attention, scales
from var_jax.attention import flash, poly

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs", "Directory for the CSV files and PNG plots.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
flags.DEFINE_integer("min_n", 16, "Smallest last-scale side.")
flags.DEFINE_integer("max_n", None, "Largest last-scale side (default 128 on CPU, 256 else).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 8, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_float("logit_bound", 4.0, "Temperature: logits lie in [-bound, bound] (VAR: 4 at "
                   "initialisation, up to 100).")
# Every registered backend with a kernel of its own ("auto" runs one of them), plus one
# unmasked fused call over the whole sequence as the dense baseline.
flags.DEFINE_list("backends", [*attention.sampling_backend_names(), "dense_full"],
                  "Backends of the time sweep (attention.BACKENDS or dense_full).")
flags.DEFINE_integer("num_features", 256, "FAVOR+ features in the time sweep.")
flags.DEFINE_integer("degree", 2, "Polynomial degree in the time sweep.")
flags.DEFINE_integer("max_exact_n", None, "Largest n for the O(L^2) float32 exact reference "
                     "(default 128 on CPU, 128 else).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per point (median).")
flags.DEFINE_float("seconds_per_point", 30.0, "Fewer repeats when one call is this slow.")
flags.DEFINE_float("memory_limit_gb", None, "Skip a point whose compiled memory exceeds this "
                   "(default 8 on CPU, 60 else).")
flags.DEFINE_integer("error_rows", 192, "Query rows sampled for the float64 error.")
flags.DEFINE_integer("sweep_n", 16, "Schedule side of the error sweeps.")
flags.DEFINE_integer("sweep_head_dim", 16, "Head dim of the degree sweep (rank binom(D+g, g)).")
flags.DEFINE_bool("sweeps", True, "Run the error sweeps (2 and 3).")
flags.DEFINE_integer("seed", 0, "Seed of inputs and random features.")


def make_inputs(patch_nums, batch, heads, head_dim, bound, dtype, seed):
    layout = scales.token_layout(patch_nums)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, layout.seq_len, heads, head_dim)
    q = jax.random.normal(kq, shape, jnp.float32)
    k = jax.random.normal(kk, shape, jnp.float32)
    v = jax.random.normal(kv, shape, jnp.float32)
    q = bound * q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return tuple(x.astype(dtype) for x in (q, k, v))


def backend_fn(name, patch_nums, options):
    """(q, k, v, rng) -> out for a named benchmark entry."""
    if name == "dense_full":
        impl = flash.default_implementation(FLAGS.dtype)
        return lambda q, k, v, rng: jax.nn.dot_product_attention(q, k, v, scale=1.0,
                                                                 implementation=impl)
    return lambda q, k, v, rng: attention.block_causal_attention(
        q, k, v, patch_nums, backend=name, rng=rng, **options)


def compile_fn(fn, args):
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        stats = compiled.memory_analysis()
        peak = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    except Exception:
        peak = float("nan")
    return compiled, peak


def time_compiled(compiled, args, repeats, budget):
    """(median seconds, calls timed, last output). A call slower than ``budget`` is timed once,
    warm-up included (allocation is negligible next to it)."""
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    if first > budget:
        return first, 1, out
    times = []
    while len(times) < repeats and sum(times) <= budget:
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times), out


def sample_rows(layout, count, rng):
    """Query rows spread over every scale (all rows of tiny scales, a random subset of others)."""
    per_scale = max(1, count // layout.num_scales)
    rows = []
    for begin, end in layout.begin_ends:
        if end - begin <= per_scale:
            rows.extend(range(begin, end))
        else:
            rows.extend(rng.choice(np.arange(begin, end), per_scale, replace=False).tolist())
    return np.array(sorted(rows))


def reference_rows(q, k, v, layout, rows):
    """Float64 block-causal attention of the given query rows: (B, R, H, D)."""
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64).transpose(0, 2, 1, 3)
               for x in (q, k, v))  # (B, H, L, D)
    out = np.zeros((q.shape[0], q.shape[1], len(rows), v.shape[3]))
    levels = layout.level_ids[rows]
    for level, (_, end) in enumerate(layout.begin_ends):
        sel = np.flatnonzero(levels == level)
        if not len(sel):
            continue
        logits = q[:, :, rows[sel]] @ k[:, :, :end].swapaxes(-1, -2)  # BLAS, (B, H, r, end)
        logits -= logits.max(-1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(-1, keepdims=True)
        out[:, :, sel] = w @ v[:, :, :end]
    return out.transpose(0, 2, 1, 3)


def errors(out, ref, v):
    diff = np.asarray(out, np.float64) - ref
    scale = np.abs(np.asarray(v, np.float64)).max()
    return float(np.abs(diff).max() / scale), float(np.sqrt((diff ** 2).mean()) / scale)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(title, rows, columns):
    print(f"\n## {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = []
        for c in columns:
            x = r.get(c, "")
            cells.append(f"{x:.4g}" if isinstance(x, float) else str(x))
        print("| " + " | ".join(cells) + " |")


def slope(points):
    """Least-squares slope of log time against log L."""
    if len(points) < 2:
        return float("nan")
    x, y = (np.log(np.array(a, np.float64)) for a in zip(*points, strict=True))
    return float(np.polyfit(x, y, 1)[0])


def time_sweep(on_gpu, dtype):
    max_n = FLAGS.max_n or (256 if on_gpu else 128)
    max_exact = FLAGS.max_exact_n or 128
    limit = (FLAGS.memory_limit_gb or (60.0 if on_gpu else 8.0)) * 2 ** 30
    ns = [n for n in (16, 32, 64, 128, 256, 512) if FLAGS.min_n <= n <= max_n]
    options = {"favor": {"num_features": FLAGS.num_features}, "poly": {"degree": FLAGS.degree}}
    rng = jax.random.key(FLAGS.seed + 1)
    rows = []
    for n in ns:
        patch_nums = scales.geometric_schedule(n)
        layout = scales.token_layout(patch_nums)
        q, k, v = make_inputs(patch_nums, FLAGS.batch, FLAGS.heads, FLAGS.head_dim,
                              FLAGS.logit_bound, dtype, FLAGS.seed)
        err_rows = sample_rows(layout, FLAGS.error_rows, np.random.default_rng(FLAGS.seed))
        ref = reference_rows(q, k, v, layout, err_rows)
        for name in FLAGS.backends:
            row = {"n": n, "L": layout.seq_len, "backend": name, "dtype": FLAGS.dtype,
                   "time_s": float("nan"), "repeats": 0, "peak_bytes": float("nan"),
                   "err_max": float("nan"), "err_rms": float("nan"), "note": ""}
            rows.append(row)
            if name == "exact" and n > max_exact:
                row["note"] = f"skipped: n > max_exact_n={max_exact}"
                continue
            args = (q, k, v, rng)
            try:
                compiled, peak = compile_fn(backend_fn(name, patch_nums, options.get(name, {})),
                                            args)
            except Exception as err:
                row["note"] = f"compile failed: {type(err).__name__}: {str(err)[:80]}"
                continue
            row["peak_bytes"] = peak
            if peak > limit:
                row["note"] = f"skipped: {peak / 2**30:.1f} GiB > memory limit"
                continue
            try:
                row["time_s"], row["repeats"], out = time_compiled(
                    compiled, args, FLAGS.repeats, FLAGS.seconds_per_point)
                if name != "dense_full":  # a different function: no error vs block-causal
                    out = np.asarray(out.astype(jnp.float32))[:, err_rows]
                    row["err_max"], row["err_rms"] = errors(out, ref, v)
            except Exception as err:
                row["note"] = f"run failed: {type(err).__name__}: {str(err)[:80]}"
                continue
            print(f"n={n:4d} L={layout.seq_len:6d} {name:10s} {row['time_s'] * 1e3:10.2f} ms "
                  f"peak {peak / 2**20:9.1f} MiB err {row['err_max']:.3g}", flush=True)
            del compiled
    return rows


def bound_sweep(dtype):
    """Error against the logit bound at fixed rank: poly degree 2 vs favor with equal features."""
    patch_nums = scales.geometric_schedule(FLAGS.sweep_n)
    layout = scales.token_layout(patch_nums)
    rank = poly.rank(FLAGS.head_dim, 2)
    rows = []
    entries = [("poly", {"degree": 2}), ("favor", {"num_features": rank}),
               ("favor", {"num_features": FLAGS.num_features})]
    fns = {i: jax.jit(backend_fn(name, patch_nums, opts)) for i, (name, opts) in
           enumerate(entries)}
    err_rows = np.arange(layout.seq_len)
    for bound in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        q, k, v = make_inputs(patch_nums, FLAGS.batch, FLAGS.heads, FLAGS.head_dim, bound, dtype,
                              FLAGS.seed)
        ref = reference_rows(q, k, v, layout, err_rows)
        for i, (name, opts) in enumerate(entries):
            out = np.asarray(fns[i](q, k, v, jax.random.key(FLAGS.seed + 2)).astype(jnp.float32))
            err_max, err_rms = errors(out, ref, v)
            rank_i = rank if name == "poly" else opts["num_features"]
            entry = poly.taylor_error_bound(2, bound) if name == "poly" else float("nan")
            rows.append({"logit_bound": bound, "backend": name, "rank": rank_i,
                         "err_max": err_max, "err_rms": err_rms,
                         "predicted_max": 2 * entry / (1 - entry) if entry < 1 else float("nan")})
    return rows


def rank_sweep(dtype):
    """Error against degree (poly) and number of features (favor) at a fixed bound."""
    patch_nums = scales.geometric_schedule(FLAGS.sweep_n)
    layout = scales.token_layout(patch_nums)
    dim = FLAGS.sweep_head_dim
    rows = []
    for bound in (1.0, 4.0):
        q, k, v = make_inputs(patch_nums, FLAGS.batch, FLAGS.heads, dim, bound, dtype,
                              FLAGS.seed)
        ref = reference_rows(q, k, v, layout, np.arange(layout.seq_len))
        for degree in (1, 2, 3, 4):
            for approx, opts in (("taylor", {}), ("chebyshev", {"logit_bound": bound})):
                fn = jax.jit(backend_fn("poly", patch_nums,
                                        dict(degree=degree, approximation=approx, **opts)))
                out = np.asarray(fn(q, k, v, None).astype(jnp.float32))
                err_max, err_rms = errors(out, ref, v)
                coeffs = poly.exp_poly_coefficients(degree, approx, logit_bound=bound)
                entry = poly.relative_error(coeffs, bound)
                rows.append({"logit_bound": bound, "backend": f"poly-{approx}", "degree": degree,
                             "rank": poly.rank(dim, degree), "err_max": err_max,
                             "err_rms": err_rms,
                             "predicted_max": 2 * entry / (1 - entry) if entry < 1 else math.nan})
        for m in (16, 64, 256, 1024, 4096):
            fn = jax.jit(backend_fn("favor", patch_nums, {"num_features": m}))
            errs = [errors(np.asarray(fn(q, k, v, jax.random.key(s)).astype(jnp.float32)), ref, v)
                    for s in range(3)]
            rows.append({"logit_bound": bound, "backend": "favor", "degree": "", "rank": m,
                         "err_max": float(np.mean([e[0] for e in errs])),
                         "err_rms": float(np.mean([e[1] for e in errs])),
                         "predicted_max": math.nan})
    return rows


def plot(out_dir, time_rows, bound_rows, rank_rows):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG plots (the CSV files are written)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in FLAGS.backends:
        pts = [(r["L"], r["time_s"], r["peak_bytes"]) for r in time_rows
               if r["backend"] == name and r["time_s"] == r["time_s"]]
        if pts:
            axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            axes[1].loglog([p[0] for p in pts], [p[2] for p in pts], "o-", label=name)
    axes[0].set(xlabel="L (tokens)", ylabel="time (s)", title=f"forward time, {FLAGS.dtype}")
    axes[1].set(xlabel="L (tokens)", ylabel="compiled peak bytes", title="memory")
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "attention_time.png"), dpi=120)
    plt.close(fig)
    if bound_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({(r["backend"], r["rank"]) for r in bound_rows}):
            pts = [r for r in bound_rows if (r["backend"], r["rank"]) == label]
            ax.loglog([r["logit_bound"] for r in pts], [r["err_max"] for r in pts], "o-",
                      label=f"{label[0]} rank {label[1]}")
        pts = [r for r in bound_rows if r["backend"] == "poly" and r["predicted_max"] == r[
            "predicted_max"]]
        ax.loglog([r["logit_bound"] for r in pts], [r["predicted_max"] for r in pts], "k--",
                  label="poly bound 2e/(1-e)")
        ax.set(xlabel="logit bound", ylabel="max |err| / max |v|",
               title="error vs logit bound (fixed rank)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "attention_error_bound.png"), dpi=120)
        plt.close(fig)
    if rank_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({(r["backend"], r["logit_bound"]) for r in rank_rows}):
            pts = [r for r in rank_rows if (r["backend"], r["logit_bound"]) == label]
            ax.loglog([r["rank"] for r in pts], [r["err_max"] for r in pts], "o-",
                      label=f"{label[0]}, bound {label[1]}")
        ax.set(xlabel="rank (features)", ylabel="max |err| / max |v|",
               title=f"error vs rank (head dim {FLAGS.sweep_head_dim})")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "attention_error_rank.png"), dpi=120)
        plt.close(fig)


def summary(time_rows):
    """Ratios against exact and the fused call, log-log slopes, memory per token."""
    lines = []
    by = {(r["n"], r["backend"]): r for r in time_rows}
    for n in sorted({r["n"] for r in time_rows}):
        for base in ("exact", "flash"):
            b = by.get((n, base))
            if not b or b["time_s"] != b["time_s"]:
                continue
            for name in ("favor", "poly"):
                r = by.get((n, name))
                if r and r["time_s"] == r["time_s"]:
                    lines.append(f"n={n} L={r['L']}: {name} is {b['time_s'] / r['time_s']:.1f}x "
                                 f"faster than {base}")
    for name in FLAGS.backends:
        pts = [(r["L"], r["time_s"]) for r in time_rows
               if r["backend"] == name and r["time_s"] == r["time_s"] and r["L"] >= 2240]
        ends = [p for p in pts if p[0] in (2240, 39404)]
        lines.append(f"{name}: log-log slope of time vs L over L >= 2240: {slope(pts):.2f} "
                     f"({len(pts)} points); from L = 2240 to 39404: {slope(ends):.2f}")
        mem = [(r["L"], r["peak_bytes"]) for r in time_rows
               if r["backend"] == name and r["peak_bytes"] == r["peak_bytes"]]
        if len(mem) >= 2:
            lines.append(f"{name}: log-log slope of compiled peak memory vs L: {slope(mem):.2f}; "
                         f"bytes per token at the largest L: {mem[-1][1] / mem[-1][0]:.0f}")
    return lines


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    dtype = jnp.dtype(FLAGS.dtype)
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    header = (f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
              f"{device.platform} {getattr(device, 'device_kind', '')}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
              f"python {platform.python_version()}, B={FLAGS.batch} H={FLAGS.heads} "
              f"D={FLAGS.head_dim} dtype={FLAGS.dtype} logit bound {FLAGS.logit_bound}")
    print(header, flush=True)
    time_rows = time_sweep(on_gpu, dtype)
    write_csv(os.path.join(FLAGS.out, "attention_time.csv"), time_rows)
    bound_rows = rank_rows = []
    if FLAGS.sweeps:
        bound_rows = bound_sweep(dtype)
        write_csv(os.path.join(FLAGS.out, "attention_error_bound.csv"), bound_rows)
        rank_rows = rank_sweep(dtype)
        write_csv(os.path.join(FLAGS.out, "attention_error_rank.csv"), rank_rows)
    plot(FLAGS.out, time_rows, bound_rows, rank_rows)
    print("\n" + header)
    print_table("time sweep", time_rows, ["n", "L", "backend", "time_s", "repeats",
                                          "peak_bytes", "err_max", "err_rms", "note"])
    if bound_rows:
        print_table("error vs logit bound (fixed rank)", bound_rows,
                    ["logit_bound", "backend", "rank", "err_max", "err_rms", "predicted_max"])
        print_table("error vs degree / features", rank_rows,
                    ["logit_bound", "backend", "degree", "rank", "err_max", "err_rms",
                     "predicted_max"])
    print("\n## summary (same process)")
    for line in summary(time_rows):
        print("- " + line)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    app.run(main)
