"""The training loop shared by every recipe (tokenizer, VAR, or anything with a loss).

A recipe follows the `Recipe` protocol below (`RecipeDefaults` supplies the optional parts). The
loop owns the mesh, the train step (compiled once at start with explicit shardings and donated
state, its per-device memory printed), resume, checkpoints, metrics, sample grids, the
non-finite guard and preemption: on SIGTERM every process agrees on a step through the step's
own all-reduce, saves there and returns with `summary["preempted"] = True`.

Host-side work (evaluation, sample grids) sees the model with its parameters gathered to every
device of the mesh and the frozen arrays replicated there, so it runs the same on one device, on
a mesh and across processes; only process 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx

from var_jax import data as data_lib
from var_jax import xla_options
from var_jax.train import checkpoint as ckpt_lib
from var_jax.train import metrics as metrics_lib
from var_jax.train import preemption, profiling, sharding
from var_jax.train import step as step_lib


class Recipe(Protocol):
    """What the loop trains. Traced methods run inside the jitted step; host methods do not."""

    name: str  # sub-directory of the workdir for this stage
    steps: int
    batch_size: int  # global, over every process

    def create_model(self, key: jax.Array) -> nnx.Module: ...

    def optimizer(self) -> tuple[optax.GradientTransformation, Callable]:
        """(transformation, learning-rate schedule)."""

    def loss(self, model, frozen, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """Traced: (scalar loss, metrics)."""

    def post_update(self, model, frozen, metrics: dict, key: jax.Array) -> dict:
        """Traced, after the optimizer update; may edit the model (e.g. dead-code re-seeding)."""

    def frozen(self) -> Any:
        """A pytree of arrays the loss reads but does not train (e.g. a frozen tokenizer)."""

    def prepare_batch(self, batch: dict) -> dict:
        """Host side, per process, before the batch becomes a global array."""

    def evaluate(self, model, frozen) -> dict | None:
        """Host side; None when the recipe has no evaluation."""

    def sample_grid(self, model, frozen, key: jax.Array) -> np.ndarray | None:
        """Host side: uint8 (H, W, 3), or None when the recipe has no samples."""

    def compiler_options(self) -> tuple:
        """XLA options for the train step, (name, value) pairs (:mod:`var_jax.xla_options`)."""


class RecipeDefaults:
    """The optional parts of a `Recipe`, doing nothing."""

    post_update = None  # no post-update step (checked by the loop, so nothing is traced)

    def frozen(self) -> Any:
        return None

    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def evaluate(self, model, frozen) -> dict | None:
        return None

    def sample_grid(self, model, frozen, key) -> np.ndarray | None:
        return None

    def compiler_options(self) -> tuple:
        return ()


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss or gradient norm is NaN/Inf; no checkpoint is written after."""


def _log(msg: str) -> None:
    """Process 0 shows each message once on the terminal (``metrics.echo``); others log it."""
    if jax.process_index() == 0:
        metrics_lib.echo(msg)
    else:
        logging.info(msg)


def make_train_iterator(config, batch_size: int, mesh=None) -> data_lib.DataIterator:
    """This process's slice of every global batch (the same global batches for any process
    count, so runs on different topologies see the same data)."""
    per_process = (sharding.check_local_batch(batch_size, mesh) if mesh is not None
                   else batch_size // jax.process_count())
    source = data_lib.make_source(config.data, "train")
    ds = data_lib.make_dataset(
        source, batch_size=per_process, seed=config.seed, train=True,
        image_size=config.data.image_size, shard_index=jax.process_index(),
        shard_count=jax.process_count(), num_threads=config.data.num_threads,
        global_order=True)
    return data_lib.DataIterator(ds, source)


def _portable_data_state(state: dict) -> dict:
    # Grain counts this process's examples; the global count restores under any process count.
    return dict(state, global_next_index=int(state["next_index"]) * jax.process_count())


def _local_data_state(state: dict) -> dict:
    state = dict(state)
    total = state.pop("global_next_index", None)
    if total is not None:
        state["next_index"] = total // jax.process_count()
    return state


def _memory_line(name: str, compiled) -> str:
    try:
        mem = compiled.memory_analysis()
    except Exception:
        mem = None
    if mem is None:
        return f"[{name}] compiled train step (no memory analysis on this backend)"
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    return (f"[{name}] compiled train step, per device: arguments "
            f"{mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)} "
            f"(aliased {mib(mem.alias_size_in_bytes)}), temporaries "
            f"{mib(mem.temp_size_in_bytes)}, code {mib(mem.generated_code_size_in_bytes)}")


class Trainer:
    """Builds the state (fresh or resumed) and runs the steps of one recipe."""

    def __init__(self, recipe: Recipe, config, workdir: str, mesh=None):
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
        self.shardings = sharding.state_shardings(abstract, self.mesh,
                                                  config.mesh.fsdp_min_size)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(self.dir, "checkpoints"), keep=tcfg.keep_checkpoints,
            every=tcfg.checkpoint_every)
        self.iterator = make_train_iterator(config, recipe.batch_size, self.mesh)
        self.writer = metrics_lib.MetricWriter(self.dir)
        target = ckpt_lib.abstract_with_shardings(abstract, self.shardings)
        restored = self.checkpointer.restore_latest(target)
        if restored is not None:
            latest, self.state, data_state, _ = restored
            self.iterator.set_state(_local_data_state(data_state))
            _log(f"[{recipe.name}] resumed from {self.checkpointer.directory} at step {latest}")
        else:
            self.state = jax.jit(init, out_shardings=self.shardings)(key)
        self.frozen = sharding.replicate(recipe.frozen(), self.mesh)
        frozen_sh = jax.tree.map(lambda _: sharding.replicated(self.mesh), self.frozen)
        train_step = step_lib.make_train_step(
            self.graphdef, recipe.loss, self.tx, self.lr_fn, recipe.post_update)
        batch_sh = sharding.batch_sharding(self.mesh)
        self._jitted_step = jax.jit(
            train_step, in_shardings=(self.shardings, frozen_sh, batch_sh, batch_sh),
            out_shardings=(self.shardings, sharding.replicated(self.mesh)),
            donate_argnums=(0,))
        self.step_fn = None  # compiled at the first batch (shapes known), once
        self.sample_paths: list[str] = []
        self.last_train_metrics: dict = {}
        self.last_eval_metrics: dict = {}
        self._stop_agreed = False

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def model(self):
        """The model with the training layout (parameters sharded as in training)."""
        return step_lib.merge_model(self.graphdef, self.state)

    def host_model(self):
        """The model with every array replicated on the mesh, for evaluation and sampling."""
        state = {k: self.state[k] for k in ("params", "extra")}
        return step_lib.merge_model(self.graphdef, sharding.gather_replicated(state, self.mesh))

    def _meta(self) -> dict:
        return {"stage": self.recipe.name, "process_count": jax.process_count(),
                "mesh": dict(self.mesh.shape),
                "config": json.loads(self.config.to_json_best_effort())}

    def _compile(self, batch: dict, stop) -> None:
        t = time.time()
        self.step_fn = xla_options.compile_lowered(
            self._jitted_step.lower(self.state, self.frozen, batch, stop),
            self.recipe.compiler_options())
        _log(_memory_line(self.recipe.name, self.step_fn)
             + f"; mesh {dict(self.mesh.shape)}, {time.time() - t:.1f}s")

    def _stop_array(self, requested: bool):
        local = np.full((self.mesh.devices.size // jax.process_count(),), int(requested),
                        np.int32)
        return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh), local)

    def _consume(self, fetched, progress) -> None:
        if fetched is None:
            return
        step, metrics = fetched
        if metrics.get("stop", 0):
            self._stop_agreed = True
        if not metrics["finite"]:
            last = self.checkpointer.latest_step()
            raise NonFiniteLossError(
                f"[{self.recipe.name}] non-finite loss or gradient at step {step} "
                f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); "
                f"stopping. The last good checkpoint is step {last} in "
                f"{self.checkpointer.directory}; nothing after it was saved.")
        metrics = {k: v for k, v in metrics.items() if k != "stop"}
        self.last_train_metrics = metrics
        log_every = self.config.train.log_every
        if step % log_every == 0 or step == self.recipe.steps or step == 1:
            self.writer.write_scalars(step, metrics, "train")
            if jax.process_index() == 0:  # one progress line per run, not one per process
                progress.line(step, metrics)

    def _save(self, step: int, progress) -> None:
        self._consume(self.late.flush(), progress)
        self.checkpointer.save(step, self.state, _portable_data_state(self.iterator.get_state()),
                               self._meta())

    def evaluate(self, step: int) -> dict:
        t = time.time()
        metrics = self.recipe.evaluate(self.host_model(), self.frozen)
        if metrics is None:
            return {}
        self.writer.write_scalars(step, metrics, "eval")
        _log(f"[{self.recipe.name}] eval at step {step} ({time.time() - t:.0f}s): "
             + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.ndim(v) == 0))
        self.last_eval_metrics = metrics
        return metrics

    def write_samples(self, step: int) -> str | None:
        key = jax.random.fold_in(jax.random.key(self.config.seed), 10_000 + step)
        grid = self.recipe.sample_grid(self.host_model(), self.frozen, key)
        if grid is None:
            return None
        path = self.writer.write_image(step, "samples", grid)
        if path:
            self.sample_paths.append(path)
        return path

    def _preemption_notice(self, step: int) -> bool:
        # The platform's own notice (e.g. TPU maintenance), which the JAX runtime turns into one
        # agreed step for every process; only exists with jax.distributed.
        if jax.process_count() == 1:
            return False
        try:
            return bool(self.checkpointer.manager.reached_preemption(step))
        except Exception:
            return False

    def run(self, num_steps: int | None = None) -> dict:
        """Trains to `recipe.steps` (or `num_steps` more steps); returns a summary."""
        installed_here = preemption.STOP.install()
        try:
            summary = self._run(num_steps, preemption.STOP)
        finally:
            if installed_here:
                preemption.STOP.uninstall()
        if summary["preempted"]:
            preemption.STOP.requested = False  # acted on
        return summary

    def _run(self, num_steps: int | None, stop: preemption.StopRequest) -> dict:
        tcfg = self.config.train
        total = self.recipe.steps
        start = self.step
        end = total if num_steps is None else min(total, start + num_steps)
        progress = metrics_lib.Progress(total, self.recipe.name)
        self.late = metrics_lib.LateFetcher()
        profiler = profiling.StepProfiler(self.dir, start, tcfg.profile_skip, tcfg.profile_steps)
        try:
            preempted = self._steps(start, end, stop, progress, profiler)
        finally:
            self._profiled(profiler.stop(self.state))
        self._consume(self.late.flush(), progress)
        return self._summary(preempted)

    def _steps(self, start: int, end: int, stop: preemption.StopRequest, progress,
               profiler: profiling.StepProfiler) -> bool:
        """Runs steps start .. end - 1 (saving, evaluating, sampling on the way); True when a
        stop request (SIGTERM or a preemption notice) ended them early."""
        tcfg = self.config.train
        total = self.recipe.steps
        data_report_done = preempted = False
        for step in range(start, end):
            batch = sharding.put_batch(self.recipe.prepare_batch(next(self.iterator)), self.mesh)
            stop_flags = self._stop_array(stop.requested)
            if self.step_fn is None:
                self._compile(batch, stop_flags)
            profiler.before_step(step, self.state)
            self.state, metrics = self.step_fn(self.state, self.frozen, batch, stop_flags)
            self._profiled(profiler.after_step(step, self.state))
            s = step + 1
            self._consume(self.late.push(s, metrics), progress)
            if self._stop_agreed or self._preemption_notice(s):
                self._save(s, progress)
                self.checkpointer.wait()
                _log(f"[{self.recipe.name}] stop requested (SIGTERM or preemption notice): "
                     f"saved step {s} in {self.checkpointer.directory}")
                preempted = True
                break
            if self.checkpointer.should_save(s) or s == total:
                self._save(s, progress)
            at_end = s == total and tcfg.evaluate_at_end
            if tcfg.eval_every > 0 and (s % tcfg.eval_every == 0) or at_end:
                self._consume(self.late.flush(), progress)
                self.evaluate(s)
            if tcfg.sample_every > 0 and (s % tcfg.sample_every == 0) or at_end:
                self._consume(self.late.flush(), progress)
                self.write_samples(s)
            if not data_report_done:
                report = self.iterator.report()
                if report["bad_files"] or report["empty_classes"]:
                    _log(f"[{self.recipe.name}] data report: {report}")
                data_report_done = True
        return preempted

    def _profiled(self, line: str | None) -> None:
        if line:
            _log(f"[{self.recipe.name}] {line}")

    def _summary(self, preempted: bool) -> dict:
        self.checkpointer.wait()
        report = self.iterator.report()
        per_device, total_bytes = sharding.per_device_bytes(self.state["params"])
        summary = {
            "stage": self.recipe.name, "step": self.step, "dir": self.dir,
            "preempted": preempted, "mesh": dict(self.mesh.shape),
            "param_bytes": {"total": total_bytes, "largest_per_device": per_device},
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


def train(recipe: Recipe, config, workdir: str, mesh=None) -> dict:
    trainer = Trainer(recipe, config, workdir, mesh)
    try:
        return trainer.run()
    finally:
        trainer.close()


def restore_state(recipe: Recipe, run_dir: str, step: int | None = None, mesh=None):
    """(step, graphdef, train state) from the latest (or given) checkpoint in `run_dir`, every
    array replicated on `mesh` (every process's devices), or on this process's first device
    without one; the checkpoint may come from any mesh or process count."""
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
        where = (sharding.replicated(mesh) if mesh is not None
                 else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        target = ckpt_lib.abstract_with_shardings(abstract, jax.tree.map(lambda _: where,
                                                                         abstract))
        if step is None:
            restored = checkpointer.restore_latest(target)
            if restored is None:
                raise ValueError(f"checkpoint: no checkpoint in {ckpt_dir!r}")
            step, state = restored[:2]
        else:
            state = checkpointer.restore(step, target)[0]
    finally:
        checkpointer.close()
    return step, holder["graphdef"], state


def restore_model(recipe: Recipe, run_dir: str, step: int | None = None, mesh=None):
    """The model of a recipe from the latest (or given) checkpoint in `run_dir` (see
    `restore_state` for where its arrays go)."""
    _, graphdef, state = restore_state(recipe, run_dir, step, mesh)
    return step_lib.merge_model(graphdef, state)
