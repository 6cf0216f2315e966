"""The device mesh and every sharding rule of the training system, in one place.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose
parameters and optimizer state are also split). A batch is split over both axes; a parameter
is split over "fsdp" along its largest dimension that divides evenly, and replicated when it is
small or nothing divides. A 1-device mesh is the ordinary single-host case and costs nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated: splitting them costs more than it saves.
FSDP_MIN_SIZE = 2**14


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh; `mesh.data = -1` takes every device not used by fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if fsdp < 1:
        raise ValueError(f"mesh.fsdp: expected >= 1, found {fsdp}")
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"mesh.fsdp: expected a divisor of the {len(devices)} devices, "
                             f"found {fsdp}")
        data = len(devices) // fsdp
    if data < 1 or data * fsdp != len(devices):
        raise ValueError(f"mesh: expected data x fsdp = {len(devices)} devices, found "
                         f"data={mesh_config.data} fsdp={fsdp}")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int | None = None) -> P:
    """Splits the largest evenly divisible dimension over "fsdp"; small arrays stay replicated."""
    min_size = FSDP_MIN_SIZE if min_size is None else min_size
    if fsdp_size == 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh):
    """NamedShardings for a train-state pytree (parameters, optimizer moments, scalars)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp_size)), abstract_state)


def put_batch(batch: dict, mesh) -> dict:
    """Host (per-process) numpy batch -> global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    size = mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % max(size, 1):
            raise ValueError(f"batch: expected a per-process batch divisible by {size} local "
                             f"devices, found {x.shape[0]}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
