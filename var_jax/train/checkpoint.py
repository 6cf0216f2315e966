"""Orbax checkpoints of the whole training state: arrays, data-iterator position and metadata.

A checkpoint holds three items: "state" (parameters, optimizer state, step, rng key data, and any
non-parameter model state, saved with StandardSave and restored into the current shardings, so a
checkpoint written on one mesh or process count restores on another), "data" (the Grain
iterator's JSON state plus the position in examples over all processes) and "meta" (JSON:
config and stage). Restoring all three gives an exact resume. Every process takes part in save
and restore (Orbax writes each array shard from the process that holds it).

A save that was interrupted leaves either an Orbax temporary folder (never listed as a step) or a
step folder whose contents do not restore; `restore_latest` passes over both with a warning and
moves the broken folder aside, so the last complete checkpoint is used and never overwritten.
A checkpoint that reads but holds other arrays than the model being restored (a changed config:
another depth, width or scale schedule) is not broken: restoring it raises a ValueError naming
the arrays that differ, and the folder stays where it is.
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

TMP_MARKER = ".orbax-checkpoint-tmp"


def _warn(msg: str) -> None:
    logging.warning(msg)
    if jax.process_index() == 0:
        print(f"WARNING: {msg}", flush=True)


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the last `keep`, resumes from the latest."""

    def __init__(self, directory: str, *, keep: int, every: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints: expected >= 1, found {keep}")
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """{array path: shape} of the state saved at `step`, or None when its metadata does not
        read (a save that did not finish)."""
        try:
            tree = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory) / str(step) / "state")
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}
        except Exception:  # noqa: BLE001 - any failure to read means a broken folder
            return None

    def check_matches(self, step: int, abstract_state) -> None:
        """Raises a ValueError naming the arrays in which the checkpoint at `step` differs from
        `abstract_state` (a config that does not describe the checkpointed model)."""
        saved = self.saved_shapes(step)
        if saved is None:
            return  # unreadable: left to the restore, which fails and sets it aside
        problems = mismatches(saved, {
            _path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]})
        if problems:
            # The same parameters under another optimiser (e.g. var.optimizer changed): say so.
            what = ("the same parameters with another optimiser's state than the config's "
                    "(is the optimiser, e.g. var.optimizer, the one the run was trained with?)"
                    if all(line.startswith("opt_state") for line in problems) else
                    "another model than the config describes (is the config the one the run "
                    "was trained with?)")
            raise ValueError(
                f"checkpoint: step {step} in {self.directory} holds {what}; {len(problems)} of "
                f"its arrays differ: " + "; ".join(problems[:6])
                + ("; ..." if len(problems) > 6 else ""))

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state, meta); abstract_state carries the target shardings."""
        self.check_matches(step, abstract_state)
        return self._restore_arrays(step, abstract_state)

    def _restore_arrays(self, step: int, abstract_state):
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def restore_latest(self, abstract_state):
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None."""
        if os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                if TMP_MARKER in name:
                    _warn(f"checkpoint: passing over {name!r} in {self.directory}, a save that "
                          f"did not finish")
        for step in sorted(self.all_steps(), reverse=True):
            self.check_matches(step, abstract_state)  # a config mismatch is not a broken save
            try:
                return (step, *self._restore_arrays(step, abstract_state))
            except Exception as e:
                _warn(f"checkpoint: step {step} in {self.directory} does not restore "
                      f"({type(e).__name__}: {str(e)[:200]}); passing over it")
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        # Renamed, not deleted: the user may want to look at it; a later save of the same step
        # number then writes a fresh folder.
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):
                os.rename(path, f"{path}.unreadable-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _path_name(path) -> str:
    """'params/blocks/attn/qkv/kernel'-style name of a pytree path (dict keys, sequence indices
    and attribute names alike, as both Orbax's metadata and the live state spell them)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def mismatches(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """What differs between two {array path: shape} maps, each line naming the path."""
    problems = [f"{name}: checkpoint {saved[name]}, config {shape}"
                for name, shape in expected.items() if name in saved and saved[name] != shape]
    problems += [f"{name}: in the config, not in the checkpoint"
                 for name in expected if name not in saved]
    problems += [f"{name}: in the checkpoint, not in the config"
                 for name in saved if name not in expected]
    # The parameters first: the optimizer's moments repeat each parameter's difference.
    return sorted(problems, key=lambda line: line.startswith("opt_state"))


def abstract_with_shardings(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
