"""Orbax checkpoints of the whole training state: arrays, data-iterator position and metadata.

A checkpoint holds three items: "state" (parameters, optimizer state, step, rng key data, and any
non-parameter model state, saved with StandardSave and restored into the current shardings),
"data" (the Grain iterator's JSON state) and "meta" (JSON: config and stage). Restoring all three
gives an exact resume.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state, meta); abstract_state carries the target shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
