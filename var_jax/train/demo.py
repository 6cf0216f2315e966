"""The end-to-end demo behind scripts/demo.py: both training stages, the classifier and the
sample evaluation, with every figure written to `<workdir>/demo_report.json`."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from PIL import Image

from var_jax import data as data_lib
from var_jax.data import fashion_mnist
from var_jax.evaluate import classifier as classifier_lib
from var_jax.evaluate import sample_metrics
from var_jax.train import config as config_lib
from var_jax.train import runner, tokenizer_recipe, var_recipe


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def get_classifier(config, workdir: str, test_images, test_labels):
    """Trains the scoring classifier once (saved under <workdir>/classifier), returns it."""
    path = os.path.abspath(os.path.join(workdir, "classifier", "params"))
    num_classes = config_lib.var_config(config).num_classes
    size = config.data.image_size
    template = classifier_lib.Classifier(size, num_classes, rngs=nnx.Rngs(0))
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(path):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: template))
        model = nnx.merge(graphdef, checkpointer.restore(path, abstract))
        _log(f"classifier restored from {path}")
    else:
        c = config.classifier
        source = data_lib.make_source(config.data, "train")
        it = data_lib.DataIterator(data_lib.make_dataset(
            source, batch_size=c.batch_size, seed=config.seed + 1, train=True,
            image_size=size), source)
        model = classifier_lib.train_classifier(
            it, image_size=size, num_classes=num_classes, steps=c.steps, lr=c.lr,
            seed=config.seed)
        checkpointer.save(path, nnx.state(model))
        checkpointer.wait_until_finished()
    return model, classifier_lib.accuracy(model, test_images, test_labels)


def run_demo(config, workdir: str) -> dict:
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    if config.data.source == "fashion_mnist" and not fashion_mnist.available(
            config.data.root or fashion_mnist.DEFAULT_ROOT):
        _log("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist); "
             "falling back to scikit-learn digits")
        config.data.source = "digits"  # digits are Lanczos-resized to data.image_size
    config_lib.validate(config, num_devices=jax.device_count())
    times, report = {}, {"data": config.data.source}

    t = time.time()
    tok = runner.run_stage(config, workdir, "tokenizer")
    times["tokenizer_s"] = time.time() - t
    t = time.time()
    var = runner.run_stage(config, workdir, "var")
    times["var_s"] = time.time() - t

    vqvae = var_recipe.load_trained_tokenizer(config, tok["dir"])
    model = var_recipe.load_trained_var(config, vqvae, var["dir"])
    test_images, test_labels = tokenizer_recipe.load_eval_images(config, config.data.num_eval)
    # Full-test-set figures for both stages (the in-training evaluations use a subset).
    t = time.time()
    report["tokenizer"] = tokenizer_recipe.evaluate_tokenizer(
        vqvae, test_images, config.data.eval_batch_size)
    recipe = var_recipe.VARRecipe(config, vqvae)
    report["var"] = var_recipe.evaluate_nll(recipe, model, recipe.frozen(), test_images,
                                            test_labels, config.data.eval_batch_size)
    times["eval_s"] = time.time() - t
    _log(f"tokenizer test PSNR {report['tokenizer']['psnr']:.2f} dB, code usage "
         f"{report['tokenizer']['code_usage_mean']:.3f}; VAR test token NLL "
         f"{report['var']['token_nll']:.4f}")

    t = time.time()
    classifier, acc = get_classifier(config, workdir, test_images, test_labels)
    times["classifier_s"] = time.time() - t
    report["classifier_test_accuracy"] = acc
    _log(f"classifier test accuracy {acc:.4f}")

    s = config.sample
    num_classes = recipe.model_config.num_classes
    key = jax.random.key(config.seed + 123)
    t = time.time()
    labels = np.repeat(np.arange(num_classes), s.per_class)
    grid_images = var_recipe.generate(model, vqvae, labels, key, cfg=s.cfg, top_k=s.top_k,
                                      top_p=s.top_p, more_smooth=s.more_smooth)
    grid = tokenizer_recipe.image_grid(grid_images, rows=num_classes)
    grid_path = os.path.join(workdir, "samples_grid.png")
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                 Image.Resampling.NEAREST).save(grid_path)

    labels = np.repeat(np.arange(num_classes), s.eval_per_class)
    real = test_images[:len(labels)]
    sweep = sorted(set(float(x) for x in s.cfg_sweep) | {float(s.cfg)})
    report["samples"] = {"per_class": s.eval_per_class, "top_k": s.top_k, "top_p": s.top_p,
                         "default_cfg": s.cfg, "by_cfg": {}}
    for cfg in sweep:
        images = var_recipe.generate(model, vqvae, labels, jax.random.fold_in(key, int(cfg * 100)),
                                     cfg=cfg, top_k=s.top_k, top_p=s.top_p,
                                     more_smooth=s.more_smooth)
        entry = {"class_accuracy": sample_metrics.conditional_accuracy(classifier, images,
                                                                       labels),
                 "frechet_classifier": sample_metrics.classifier_frechet(classifier, real,
                                                                         images)}
        report["samples"]["by_cfg"][str(cfg)] = entry
        _log(f"cfg {cfg}: sample class accuracy {entry['class_accuracy']:.4f}, Frechet "
             f"distance (classifier features) {entry['frechet_classifier']:.3f}")
    real_fd = sample_metrics.classifier_frechet(
        classifier, test_images[len(labels):2 * len(labels)], real * 0.5 + 0.5)
    report["samples"]["frechet_real_vs_real"] = real_fd
    times["sampling_s"] = time.time() - t
    times["total_s"] = time.time() - t0
    report["times"] = times
    report["train_summaries"] = {"tokenizer": tok, "var": var}
    report["outputs"] = {
        "sample_grid": os.path.abspath(grid_path),
        "report": os.path.abspath(os.path.join(workdir, "demo_report.json")),
        "tokenizer_metrics": os.path.abspath(os.path.join(tok["dir"], "metrics.jsonl")),
        "var_metrics": os.path.abspath(os.path.join(var["dir"], "metrics.jsonl")),
        "tokenizer_checkpoints": os.path.abspath(os.path.join(tok["dir"], "checkpoints")),
        "var_checkpoints": os.path.abspath(os.path.join(var["dir"], "checkpoints")),
        "tensorboard": os.path.abspath(workdir),
    }
    with open(report["outputs"]["report"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    return report
