"""The end-to-end demo behind scripts/demo.py: both training stages, the classifier, the sample
evaluation and four pictures. Every figure goes to `<workdir>/demo_report.json`; the terminal
gets the phases (with their time and the ETA of the run) and a short summary table."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from var_jax import data as data_lib
from var_jax import sampling
from var_jax.data import fashion_mnist
from var_jax.evaluate import classifier as classifier_lib
from var_jax.evaluate import figures, frechet, sample_metrics
from var_jax.models import construct
from var_jax.train import config as config_lib
from var_jax.train import runner, tokenizer_recipe, var_recipe
from var_jax.train.metrics import echo

# What the demo is measured against: the figures a new user should see.
BARS = {"tokenizer_psnr": (">=", 24.5), "class_accuracy_default_cfg": (">=", 0.95),
        "class_accuracy_cfg0": (">=", 0.85),
        # The bar was set on the ruler of the first runs (samples against the first test
        # images); the report's main distance is against the whole test split (see run_demo).
        "frechet_default_cfg_first_test_images": ("<=", 10.0),
        "total_minutes": ("<=", 25.0)}

# (name, estimated seconds on an idle 2-core machine with the default config, from per-step
# timings): the ETA is these times scaled by how fast this machine ran the phases done so far.
PHASES = (("tokenizer training", 440.0), ("VAR training (token cache, steps)", 690.0),
          ("test-set evaluation", 40.0), ("classifier", 45.0),
          ("samples, scores and pictures", 65.0))


def _log(msg: str) -> None:
    echo(f"[demo] {msg}")


class PhaseClock:
    """Names each phase with its number, its time and the ETA of the whole run."""

    def __init__(self, phases=PHASES):
        self.phases = phases
        self.t0 = time.time()
        self.index, self._start = -1, None
        # Measured (seconds, reference seconds) of the phases that ran; a phase restored from a
        # finished checkpoint takes ~0 s and says nothing about this machine's speed.
        self.timed, self.timed_ref = 0.0, 0.0
        self.seconds: dict[str, float] = {}

    def start(self, i: int) -> None:
        self.index, self._start = i, time.time()
        name = self.phases[i][0]
        elapsed = self._start - self.t0
        rest = sum(ref for _, ref in self.phases[i:])
        speed = self.timed / self.timed_ref if self.timed_ref else 1.0
        _log(f"phase {i + 1}/{len(self.phases)}: {name} (elapsed {elapsed / 60:.1f} min, "
             f"about {rest * speed / 60:.1f} min left)")

    def end(self) -> float:
        name, ref = self.phases[self.index]
        took = time.time() - self._start
        self.seconds[name] = took
        if took > 0.1 * ref:
            self.timed, self.timed_ref = self.timed + took, self.timed_ref + ref
        _log(f"phase {self.index + 1}/{len(self.phases)}: {name} done in {took / 60:.1f} min")
        return took


def load_test_split(config):
    """(split images, split labels, test images, test labels): the whole test split, read once
    (the samples' Frechet reference), and its first ``data.num_eval`` images (all when 0),
    which score the stages and train nothing."""
    split_images, split_labels = tokenizer_recipe.load_eval_images(config, 0)
    num_eval = config.data.num_eval or len(split_labels)
    return split_images, split_labels, split_images[:num_eval], split_labels[:num_eval]


def get_classifier(config, workdir: str, test_images, test_labels):
    """Trains the scoring classifier once (saved under <workdir>/classifier), returns it."""
    path = os.path.abspath(os.path.join(workdir, "classifier", "params"))
    num_classes = config_lib.var_config(config).num_classes
    size = config.data.image_size
    template = classifier_lib.Classifier(size, num_classes, rngs=nnx.Rngs(0))
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(path):
        graphdef, abstract = nnx.split(construct.shape_model(lambda: template))
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


def write_pictures(config, workdir: str, model, vqvae, test_images, sweep_images: dict,
                   key) -> dict:
    """The four pictures, as PNGs in `workdir` and images in `<workdir>/tb` (TensorBoard).

    sweep_images[cfg]: the evaluation samples at each cfg (class-major, the same key at every
    cfg), from which the guidance sweep shows the first two of each class.
    """
    from tensorboardX import SummaryWriter

    s = config.sample
    num_classes = config_lib.var_config(config).num_classes
    names = data_lib.make_source(config.data, "test").class_names
    options = var_recipe.sample_options(s)
    paths, rendered = {}, {}

    _, grid = var_recipe.class_grid(model, vqvae, num_classes, s.per_class, key, cfg=s.cfg,
                                    **options)
    ramp = "" if s.guidance_power == 1 else f" (ramp power {s.guidance_power:g})"
    fig = figures.class_grid_figure(grid, names, title=f"VAR samples, cfg {s.cfg:g}{ramp}")
    paths["class_grid"] = os.path.join(workdir, "samples_grid.png")
    rendered["class_grid"] = figures.save_figure(fig, paths["class_grid"])

    # One sample per class; its token maps give the running f_hat after each scale.
    maps, _ = sampling.sample(model, vqvae, np.arange(num_classes, dtype=np.int32),
                              key=jax.random.fold_in(key, 1), cfg=s.cfg, **options)
    steps = figures.coarse_to_fine_images(vqvae, maps)
    fig = figures.coarse_to_fine_figure(steps, vqvae.config.patch_nums, names,
                                        title="decoded after each scale (next-scale prediction)")
    paths["coarse_to_fine"] = os.path.join(workdir, "coarse_to_fine.png")
    rendered["coarse_to_fine"] = figures.save_figure(fig, paths["coarse_to_fine"])

    per = min(2, s.eval_per_class)
    chosen = np.concatenate([np.arange(c * s.eval_per_class, c * s.eval_per_class + per)
                             for c in range(num_classes)])
    fig = figures.guidance_sweep_figure({c: x[chosen] for c, x in sweep_images.items()}, per,
                                        names, title="the same seeds at each guidance scale")
    paths["guidance_sweep"] = os.path.join(workdir, "guidance_sweep.png")
    rendered["guidance_sweep"] = figures.save_figure(fig, paths["guidance_sweep"])

    batch = test_images[:config.data.eval_batch_size]  # the evaluation's compiled batch size
    recon = np.asarray(tokenizer_recipe._eval_batch(vqvae, jnp.asarray(batch))[3])
    n = min(10, len(batch))
    fig = figures.reconstruction_figure(batch[:n] * 0.5 + 0.5, recon[:n] * 0.5 + 0.5,
                                        title="tokenizer: test images and reconstructions")
    paths["reconstructions"] = os.path.join(workdir, "reconstructions.png")
    rendered["reconstructions"] = figures.save_figure(fig, paths["reconstructions"])

    tb = SummaryWriter(os.path.join(workdir, "tb"))
    for name, image in rendered.items():
        tb.add_image(f"demo/{name}", image, 0, dataformats="HWC")
    tb.close()
    return {k: os.path.abspath(v) for k, v in paths.items()}


def run_demo(config, workdir: str) -> dict:
    clock = PhaseClock()
    os.makedirs(workdir, exist_ok=True)
    if config.data.source == "fashion_mnist" and not fashion_mnist.available(
            config.data.root or fashion_mnist.DEFAULT_ROOT):
        _log("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist); "
             "falling back to scikit-learn digits")
        config.data.source = "digits"  # digits are Lanczos-resized to data.image_size
    config_lib.validate(config, num_devices=jax.device_count())
    report = {"data": config.data.source}

    stages = {}
    for i, stage in enumerate(("tokenizer", "var")):
        clock.start(i)
        stages[stage] = runner.run_stage(config, workdir, stage)
        clock.end()
        if stages[stage]["preempted"]:
            return _stopped(stages[stage])
    tok, var = stages["tokenizer"], stages["var"]

    clock.start(2)
    vqvae = var_recipe.load_trained_tokenizer(config, tok["dir"])
    model = var_recipe.load_trained_var(config, vqvae, var["dir"])
    split_images, split_labels, test_images, test_labels = load_test_split(config)
    # Full-test-set figures for both stages (the in-training evaluations use a subset).
    report["tokenizer"] = tokenizer_recipe.evaluate_tokenizer(
        vqvae, test_images, config.data.eval_batch_size)
    recipe = var_recipe.VARRecipe(config, vqvae)
    report["var"] = var_recipe.evaluate_nll(recipe, model, recipe.frozen(), test_images,
                                            test_labels, config.data.eval_batch_size)
    clock.end()
    _log(f"tokenizer test PSNR {report['tokenizer']['psnr']:.2f} dB, code usage "
         f"{report['tokenizer']['code_usage_mean']:.3f}; VAR test token NLL "
         f"{report['var']['token_nll']:.4f}")

    clock.start(3)
    classifier, acc = get_classifier(config, workdir, test_images, test_labels)
    clock.end()
    report["classifier_test_accuracy"] = acc
    _log(f"classifier test accuracy {acc:.4f}")

    clock.start(4)
    s = config.sample
    num_classes = recipe.model_config.num_classes
    key = jax.random.key(config.seed + 123)
    labels = np.repeat(np.arange(num_classes), s.eval_per_class)
    # The samples are measured against the whole test split's statistics, less held-out real
    # images with the samples' label mix (whose own distance is the floor for this many
    # samples); `frechet_first_test_images` keeps the ruler the bar was set on, the
    # first len(labels) test images, whose class mix and sampling noise add about 1.5-4.5 to
    # every distance (sample_metrics.frechet_reference).
    reference = sample_metrics.frechet_reference(
        classifier, split_images, split_labels, labels)
    first = test_images[:len(labels)]
    first_features = sample_metrics.real_features(classifier, first)
    sweep = sorted(set(float(x) for x in s.cfg_sweep) | {float(s.cfg)})
    report["samples"] = {"per_class": s.eval_per_class, "top_k": s.top_k, "top_p": s.top_p,
                         "guidance_power": s.guidance_power, "default_cfg": s.cfg,
                         "reference_images": len(reference.labels_N), "by_cfg": {}}
    sweep_images = {}
    for cfg in sweep:
        # The same key at every cfg: the sweep compares guidance scales on the same seeds.
        images = var_recipe.generate(model, vqvae, labels, jax.random.fold_in(key, 2), cfg=cfg,
                                     **var_recipe.sample_options(s))
        sweep_images[cfg] = images
        features = sample_metrics.sample_features(classifier, images)
        entry = {"class_accuracy": sample_metrics.conditional_accuracy(classifier, images,
                                                                       labels),
                 "frechet_classifier": reference.distance(features),
                 "frechet_first_test_images": frechet.frechet_distance(first_features, features),
                 # Within-class variety against the real images' (1 = as varied): which way
                 # the distance goes, as guidance trades variety for class fidelity.
                 "class_spread": reference.spread_ratio(features, labels)}
        report["samples"]["by_cfg"][str(cfg)] = entry
        _log(f"cfg {cfg:g}: sample class accuracy {entry['class_accuracy']:.4f}, Frechet "
             f"distance (classifier features) {entry['frechet_classifier']:.3f} "
             f"({entry['frechet_first_test_images']:.3f} against the first test images), "
             f"within-class spread {entry['class_spread']:.2f} of the real images'")
    report["samples"]["frechet_real_vs_real"] = reference.real_floor()
    report["samples"]["frechet_real_vs_real_first_test_images"] = (
        frechet.frechet_distance(sample_metrics.real_features(
            classifier, test_images[len(labels):2 * len(labels)]), first_features))
    pictures = write_pictures(config, workdir, model, vqvae, test_images, sweep_images, key)
    clock.end()

    report["times"] = {name: round(t, 1) for name, t in clock.seconds.items()}
    report["times"]["total_s"] = round(time.time() - clock.t0, 1)
    report["train_summaries"] = {"tokenizer": tok, "var": var}
    report["outputs"] = {
        **pictures,
        "report": os.path.abspath(os.path.join(workdir, "demo_report.json")),
        "tokenizer_metrics": os.path.abspath(os.path.join(tok["dir"], "metrics.jsonl")),
        "var_metrics": os.path.abspath(os.path.join(var["dir"], "metrics.jsonl")),
        "checkpoints": os.path.abspath(os.path.join(workdir, "{tokenizer,var}", "checkpoints")),
        "tensorboard": os.path.abspath(workdir),
    }
    with open(report["outputs"]["report"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    return report


def _stopped(summary: dict) -> dict:
    """SIGTERM (or a preemption notice) mid-stage: the loop saved where it stopped; evaluating
    a half-trained model would waste the time the signal asked for, so the demo ends here and
    a rerun resumes."""
    _log(f"stopped (SIGTERM or preemption notice) in {summary['stage']} training at step "
         f"{summary['step']} (saved in {summary['dir']}); the same command resumes from there")
    return {"stopped": {k: summary[k] for k in ("stage", "step", "dir")}}


def headline(report: dict) -> dict:
    """The figures that BARS measures, from a demo report."""
    by_cfg = report["samples"]["by_cfg"]
    default = by_cfg[str(float(report["samples"]["default_cfg"]))]
    out = {"tokenizer_psnr": report["tokenizer"]["psnr"],
           "class_accuracy_default_cfg": default["class_accuracy"],
           "class_accuracy_cfg0": by_cfg.get("0.0", {}).get("class_accuracy", float("nan")),
           "frechet_default_cfg_first_test_images": default["frechet_first_test_images"],
           "total_minutes": report["times"]["total_s"] / 60}
    return out


def summary_table(report: dict) -> str:
    """A few lines for the terminal: each headline figure against its bar, then the files."""
    rows = [("figure", "value", "bar", "")]
    fmt = {"tokenizer_psnr": "{:.2f} dB", "total_minutes": "{:.1f} min"}
    for name, value in headline(report).items():
        op, bar = BARS[name]
        ok = value >= bar if op == ">=" else value <= bar
        rows.append((name, fmt.get(name, "{:.3f}").format(value), f"{op} {bar:g}",
                     "ok" if ok else "missed"))
    samples = report["samples"]
    default = samples["by_cfg"][str(float(samples["default_cfg"]))]
    rows.append(("frechet_real_vs_real_first_test_images",
                 f"{samples['frechet_real_vs_real_first_test_images']:.3f}", "(reference)", ""))
    rows.append(("frechet_default_cfg / real vs real, test split",
                 f"{default['frechet_classifier']:.3f} / {samples['frechet_real_vs_real']:.3f}",
                 "(whole-split ruler)", ""))
    for cfg, entry in report["samples"]["by_cfg"].items():
        rows.append((f"cfg {float(cfg):g}: accuracy / Frechet (split, first) / class spread",
                     f"{entry['class_accuracy']:.3f} / {entry['frechet_classifier']:.2f}, "
                     f"{entry['frechet_first_test_images']:.2f} / {entry['class_spread']:.2f}",
                     "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"{name:>18}: {path}" for name, path in report["outputs"].items())
    return "\n".join(lines)
