"""Can a VAR be trained inside the certified regime and keep its quality? (the seed paper's
practical question, measured on the demo model)

    python scripts/trained_study.py --demo_workdir=runs/demo --workdir=runs/trained_study

`--config` names the demo run's config file (default configs/demo_fashion_mnist.py; any
`--config.x=y` override applies to every variant).

Needs a finished demo run (its tokenizer and scoring classifier are reused, frozen). Trains the
demo VAR (configs/demo_fashion_mnist.py) four ways on the demo's cached tokens:

  exact-s100  exact attention, the official temperature clamp (logits up to 100);
  exact-sB    exact attention with max_temperature = B (--bound), chosen so that `plan`
              certifies poly at degree --degree for the demo's L and eps = 1/L;
  poly-sB     trained with poly attention (degree --degree) at the same clamp (computed in
              the kernel form, the same function, unless --poly_train_form=features);
  favor-sB    trained with favor attention (--num_features) at the same clamp;

then evaluates each under every inference backend (exact, poly, favor with the same options):
held-out token NLL, agreement of greedy (teacher-forced argmax) tokens with the same model under
exact attention, class accuracy and Frechet distance (classifier features) of samples at the
demo's default guidance, and the sampling time per image. Beside each row: the criterion's
verdict for that backend at the model's own logit bound (the largest clamped temperature).
Writes <out>/trained_models.csv and prints the table as markdown.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from var_jax import attention, compile_cache, scales
from var_jax.evaluate import sample_metrics
from var_jax.models import construct
from var_jax.models.var import VAR
from var_jax.train import config as config_lib
from var_jax.train import demo, runner, var_recipe

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                            "demo_fashion_mnist.py")
# Not locked: the variants add attention options to the config's attn_options.
config_flags.DEFINE_config_file("config", _DEMO_CONFIG, "The demo run's config file.",
                                lock_config=False)

flags.DEFINE_string("demo_workdir", "runs/demo", "A finished demo run (tokenizer, classifier).")
flags.DEFINE_string("workdir", "runs/trained_study", "Where the four VAR runs go.")
flags.DEFINE_string("out", "docs", "Directory of trained_models.csv.")
flags.DEFINE_integer("steps", 0, "VAR training steps per variant (0: the demo config's).")
flags.DEFINE_float("bound", 0.25, "The certified clamp B (max_temperature) of the -sB variants.")
flags.DEFINE_integer("degree", 2, "poly degree (training and inference).")
flags.DEFINE_enum("poly_train_form", "kernel", ["kernel", "features"],
                  "How poly-sB's training computes its attention: the polynomial kernel on the "
                  "L x L logits, or the low-rank features; the same function (tested), the "
                  "kernel form is about 10x faster at the demo's L = 130 (rank 2145 >> L).")
flags.DEFINE_integer("num_features", 128, "favor features (training and inference).")
flags.DEFINE_integer("per_class", 50, "Samples per class for accuracy and Frechet distance.")
flags.DEFINE_list("variants", ["exact-s100", "exact-sB", "poly-sB", "favor-sB"],
                  "Which variants to train and evaluate.")
flags.DEFINE_list("inference", ["exact", "poly", "favor"],
                  "Inference backends to score each variant under (exact always runs first: "
                  "greedy agreement is measured against it).")
compile_cache.define_flag()
FLAGS = flags.FLAGS


def backends():
    """(name, backend, options) of the inference backends, exact first."""
    table = {"exact": ("exact", "exact", {}),
             "poly": (f"poly-{FLAGS.degree}", "poly", {"degree": FLAGS.degree}),
             "favor": (f"favor-{FLAGS.num_features}", "favor",
                       {"num_features": FLAGS.num_features})}
    unknown = sorted(set(FLAGS.inference) - set(table))
    if unknown:
        raise ValueError(f"--inference: expected names of {sorted(table)}, found {unknown}")
    return [table["exact"]] + [table[b] for b in table if b != "exact" and b in FLAGS.inference]


def variant_overrides(name: str) -> dict:
    table = {
        "exact-s100": dict(attn_backend="exact", max_temperature=100.0, options={}),
        "exact-sB": dict(attn_backend="exact", max_temperature=FLAGS.bound, options={}),
        "poly-sB": dict(attn_backend="poly", max_temperature=FLAGS.bound,
                        options={"degree": FLAGS.degree, "form": FLAGS.poly_train_form}),
        "favor-sB": dict(attn_backend="favor", max_temperature=FLAGS.bound,
                         options={"num_features": FLAGS.num_features}),
    }
    if name not in table:
        raise ValueError(f"--variants: expected names of {sorted(table)}, found {name!r}")
    return table[name]


def variant_config(name: str):
    config = FLAGS.config.copy_and_resolve_references()
    o = variant_overrides(name)
    config.var.model.attn_backend = o["attn_backend"]
    config.var.model.max_temperature = o["max_temperature"]
    for key, value in o["options"].items():
        setattr(config.var.model.attn_options, key, value)
    config.var.tokenizer_workdir = os.path.abspath(FLAGS.demo_workdir)
    if FLAGS.steps:
        config.var.steps = FLAGS.steps
    config_lib.validate(config, num_devices=jax.device_count())
    return config


def with_backend(model: VAR, backend: str, options: dict) -> VAR:
    """The same parameters under another attention backend (the graph holds the config)."""
    cfg = dataclasses.replace(model.config, attn_backend=backend, attn_options=options)
    graphdef, _ = nnx.split(construct.shape_model(lambda: VAR(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def greedy_tokens(recipe, model, frozen, images, batch_size: int) -> np.ndarray:
    """Teacher-forced argmax tokens (N, L) on held-out images."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def argmax(state, images, labels):
        _, x = recipe.tokens(frozen, images)
        return jnp.argmax(nnx.merge(graphdef, state)(labels, x), axis=-1)

    images, labels = images
    return np.concatenate([np.asarray(argmax(state, jnp.asarray(images[i:i + batch_size]),
                                             jnp.asarray(labels[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def verdict(backend: str, options: dict, bound: float, head_dim: int, seq_len: int) -> str:
    """The criterion's word (`attention.plan`, eps = 1/L) on this backend at this logit bound."""
    if backend == "exact":
        return "exact"
    if backend == "favor":
        return "not certified (random features)"
    g = options["degree"]
    p = attention.plan(bound, head_dim, seq_len, 1.0 / seq_len, max_degree=g)
    word = "certified" if p.certified else "not certified"
    return f"{word} at degree <= {g} (entry error bound {p.entry_error:.2g}, 1/L = " \
           f"{1.0 / seq_len:.2g})"


def main(argv):
    del argv
    compile_cache.enable(FLAGS.compilation_cache)
    for name in FLAGS.variants:
        variant_overrides(name)  # bad names fail before any training
    backends()
    rows = []
    # What every variant is scored with (variants differ in the VAR's attention only): the
    # test images, the demo's classifier and the Frechet reference, built once.
    config = variant_config(FLAGS.variants[0])
    split_images, split_labels, *test = demo.load_test_split(config)
    classifier, _ = demo.get_classifier(config, FLAGS.demo_workdir, *test)
    labels = np.repeat(np.arange(config.var.model.num_classes), FLAGS.per_class)
    frechet_reference = sample_metrics.frechet_reference(classifier, split_images, split_labels,
                                                         labels)
    for name in FLAGS.variants:
        config = variant_config(name)
        workdir = os.path.join(FLAGS.workdir, name)
        t = time.time()
        summary = runner.run_stage(config, workdir, "var")
        train_s = time.time() - t
        if summary.get("preempted"):  # SIGTERM: the run saved; rerun the command to go on
            print(f"{name}: training preempted at step {summary['step']} (checkpoint saved); "
                  "stopping before evaluation", flush=True)
            return
        vqvae = var_recipe.load_trained_tokenizer(
            config, os.path.join(FLAGS.demo_workdir, "tokenizer"))
        model = var_recipe.load_trained_var(config, vqvae, os.path.join(workdir, "var"))
        recipe = var_recipe.VARRecipe(config, vqvae)
        frozen = recipe.frozen()
        seq_len = scales.token_layout(model.config.patch_nums).seq_len
        bound = float(jnp.max(model.logit_bounds()))
        s = config.sample
        reference = None
        for infer_name, backend, options in backends():
            m = with_backend(model, backend, options)
            nll = var_recipe.evaluate_nll(recipe, m, frozen, *test,
                                          config.data.eval_batch_size)["token_nll"]
            greedy = greedy_tokens(recipe, m, frozen, test, config.data.eval_batch_size)
            if reference is None:
                reference = greedy
            key = jax.random.key(config.seed + 123)
            opts = dict(cfg=s.cfg, **var_recipe.sample_options(s))
            var_recipe.generate(m, vqvae, labels[:250], key, **opts)  # compile
            t = time.time()
            images = var_recipe.generate(m, vqvae, labels, key, **opts)
            per_image = (time.time() - t) / len(labels)
            row = {
                "trained": name, "train_backend": model.config.attn_backend,
                "clamp": model.config.max_temperature, "logit_bound": round(bound, 4),
                "inference": infer_name, "token_nll": round(float(nll), 4),
                "greedy_agreement": round(float(np.mean(greedy == reference)), 4),
                "class_accuracy": round(sample_metrics.conditional_accuracy(
                    classifier, images, labels), 4),
                "frechet": round(frechet_reference.distance(
                    sample_metrics.sample_features(classifier, images)), 3),
                "ms_per_image": round(1e3 * per_image, 2), "train_s": round(train_s),
                "verdict": verdict(backend, options, bound, model.config.head_dim, seq_len),
            }
            rows.append(row)
            print(row, flush=True)
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "trained_models.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
