"""The training loop shared by every recipe (tokenizer, VAR, or anything with a loss).

A recipe is an object with:
  name: str                                  sub-directory of the workdir for this stage
  steps: int, batch_size: int (global)       from its config section
  create_model(key) -> nnx.Module
  optimizer() -> (optax transformation, lr schedule)
  loss(model, frozen, batch, key) -> (loss, metrics)        traced inside the jitted step
  post_update(model, frozen, metrics, key) -> metrics      optional, traced; may edit the model
  frozen() -> pytree of arrays                              optional; e.g. a frozen tokenizer
  prepare_batch(batch) -> batch                             optional, host side
  evaluate(model, frozen) -> dict                           optional, host side
  sample_grid(model, frozen, key) -> uint8 (H, W, 3)        optional, host side
The loop owns the mesh, the jitted step (explicit shardings, donated state), resume, checkpoints,
metrics, sample grids and the non-finite guard.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax import data as data_lib
from var_jax.train import checkpoint as ckpt_lib
from var_jax.train import metrics as metrics_lib
from var_jax.train import sharding
from var_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss or gradient norm is NaN/Inf; no checkpoint is written after."""


_log = metrics_lib.echo  # each message once on the terminal (and in the absl log file)


def make_train_iterator(config, batch_size: int) -> data_lib.DataIterator:
    source = data_lib.make_source(config.data, "train")
    per_process = batch_size // jax.process_count()
    ds = data_lib.make_dataset(
        source, batch_size=per_process, seed=config.seed, train=True,
        image_size=config.data.image_size, shard_index=jax.process_index(),
        shard_count=jax.process_count(), num_threads=config.data.num_threads)
    return data_lib.DataIterator(ds, source)


class Trainer:
    """Builds the state (fresh or resumed) and runs the steps of one recipe."""

    def __init__(self, recipe, config, workdir: str, mesh=None):
        self.recipe, self.config = recipe, config
        self.dir = os.path.join(workdir, recipe.name)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        tcfg = config.train
        self.tx, self.lr_fn = recipe.optimizer()
        key = jax.random.key(config.seed)
        holder = {}

        def init(k):
            graphdef, state = step_lib.init_state(recipe.create_model, self.tx, k)
            holder["graphdef"] = graphdef
            return state

        abstract = jax.eval_shape(init, key)
        self.graphdef = holder["graphdef"]
        self.shardings = sharding.state_shardings(abstract, self.mesh)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(self.dir, "checkpoints"), keep=tcfg.keep_checkpoints,
            every=tcfg.checkpoint_every)
        self.iterator = make_train_iterator(config, recipe.batch_size)
        self.writer = metrics_lib.MetricWriter(self.dir)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            target = ckpt_lib.abstract_with_shardings(abstract, self.shardings)
            self.state, data_state, _ = self.checkpointer.restore(latest, target)
            self.iterator.set_state(data_state)
            _log(f"[{recipe.name}] resumed from {self.checkpointer.directory} at step {latest}")
        else:
            self.state = jax.jit(init, out_shardings=self.shardings)(key)
        replicated = NamedSharding(self.mesh, P())
        frozen = recipe.frozen() if hasattr(recipe, "frozen") else None
        self.frozen = jax.device_put(frozen, replicated)
        frozen_sh = jax.tree.map(lambda _: replicated, self.frozen)
        train_step = step_lib.make_train_step(
            self.graphdef, recipe.loss, self.tx, self.lr_fn,
            getattr(recipe, "post_update", None))
        self.step_fn = jax.jit(
            train_step,
            in_shardings=(self.shardings, frozen_sh, sharding.batch_sharding(self.mesh)),
            out_shardings=(self.shardings, replicated), donate_argnums=(0,))
        self.sample_paths: list[str] = []
        self.last_train_metrics: dict = {}
        self.last_eval_metrics: dict = {}

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def model(self):
        return step_lib.merge_model(self.graphdef, self.state)

    def _meta(self) -> dict:
        return {"stage": self.recipe.name, "config": json.loads(self.config.to_json_best_effort())}

    def _consume(self, fetched, progress) -> None:
        if fetched is None:
            return
        step, metrics = fetched
        if not metrics["finite"]:
            last = self.checkpointer.latest_step()
            raise NonFiniteLossError(
                f"[{self.recipe.name}] non-finite loss or gradient at step {step} "
                f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); "
                f"stopping. The last good checkpoint is step {last} in "
                f"{self.checkpointer.directory}; nothing after it was saved.")
        self.last_train_metrics = metrics
        log_every = self.config.train.log_every
        if step % log_every == 0 or step == self.recipe.steps or step == 1:
            self.writer.write_scalars(step, metrics, "train")
            progress.line(step, metrics)

    def _save(self, step: int, progress) -> None:
        self._consume(self.late.flush(), progress)
        self.checkpointer.save(step, self.state, self.iterator.get_state(), self._meta())

    def evaluate(self, step: int) -> dict:
        if not hasattr(self.recipe, "evaluate"):
            return {}
        t = time.time()
        metrics = self.recipe.evaluate(self.model(), self.frozen)
        self.writer.write_scalars(step, metrics, "eval")
        _log(f"[{self.recipe.name}] eval at step {step} ({time.time() - t:.0f}s): "
             + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.ndim(v) == 0))
        self.last_eval_metrics = metrics
        return metrics

    def write_samples(self, step: int) -> str | None:
        if not hasattr(self.recipe, "sample_grid"):
            return None
        key = jax.random.fold_in(jax.random.key(self.config.seed), 10_000 + step)
        grid = self.recipe.sample_grid(self.model(), self.frozen, key)
        path = self.writer.write_image(step, "samples", grid)
        if path:
            self.sample_paths.append(path)
        return path

    def run(self, num_steps: int | None = None) -> dict:
        """Trains to `recipe.steps` (or `num_steps` more steps); returns a summary."""
        tcfg = self.config.train
        total = self.recipe.steps
        start = self.step
        end = total if num_steps is None else min(total, start + num_steps)
        progress = metrics_lib.Progress(total, self.recipe.name)
        self.late = metrics_lib.LateFetcher()
        data_report_done = False
        for step in range(start, end):
            batch = next(self.iterator)
            if hasattr(self.recipe, "prepare_batch"):
                batch = self.recipe.prepare_batch(batch)
            batch = sharding.put_batch(batch, self.mesh)
            self.state, metrics = self.step_fn(self.state, self.frozen, batch)
            s = step + 1
            self._consume(self.late.push(s, metrics), progress)
            if self.checkpointer.should_save(s) or s == total:
                self._save(s, progress)
            if tcfg.eval_every > 0 and (s % tcfg.eval_every == 0) or s == total:
                self._consume(self.late.flush(), progress)
                self.evaluate(s)
            if tcfg.sample_every > 0 and (s % tcfg.sample_every == 0) or s == total:
                self._consume(self.late.flush(), progress)
                self.write_samples(s)
            if not data_report_done:
                report = self.iterator.report()
                if report["bad_files"] or report["empty_classes"]:
                    _log(f"[{self.recipe.name}] data report: {report}")
                data_report_done = True
        self._consume(self.late.flush(), progress)
        self.checkpointer.wait()
        report = self.iterator.report()
        summary = {
            "stage": self.recipe.name, "step": self.step, "dir": self.dir,
            "checkpoints": self.checkpointer.all_steps(),
            "train": {k: float(v) for k, v in self.last_train_metrics.items()
                      if np.size(v) == 1 and math.isfinite(float(v))},
            "eval": {k: v for k, v in self.last_eval_metrics.items() if np.ndim(v) == 0},
            "samples": list(self.sample_paths),
            "data_report": {"bad_files": report["bad_files"],
                            "empty_classes": report["empty_classes"]},
        }
        return summary

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()


def train(recipe, config, workdir: str, mesh=None) -> dict:
    trainer = Trainer(recipe, config, workdir, mesh)
    try:
        return trainer.run()
    finally:
        trainer.close()


def restore_model(recipe, run_dir: str, step: int | None = None):
    """The model of a recipe from the latest (or given) checkpoint in `run_dir` (one device)."""
    tx, _ = recipe.optimizer()
    holder = {}

    def init(k):
        graphdef, state = step_lib.init_state(recipe.create_model, tx, k)
        holder["graphdef"] = graphdef
        return state

    abstract = jax.eval_shape(init, jax.random.key(0))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"checkpoint: expected a {recipe.name} run at {run_dir!r} (with "
                         f"checkpoints/), found none; train that stage first")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=1000, every=0)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"checkpoint: no checkpoint in {ckpt_dir!r}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = ckpt_lib.abstract_with_shardings(
            abstract, jax.tree.map(lambda _: device, abstract))
        state, _, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return step_lib.merge_model(holder["graphdef"], state)
