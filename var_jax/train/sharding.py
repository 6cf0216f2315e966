"""The device mesh and every sharding rule of the training system, in one place.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose
parameters and optimizer state are also split). A batch is split over both axes; a parameter
is split over "fsdp" along its largest dimension that divides evenly, and replicated when it has
fewer than `mesh.fsdp_min_size` elements or nothing divides. The leading layer axis of stacked
(scanned) blocks is never split: a scan slices it one layer at a time, and splitting it would
make every layer an all-gather of the whole stack. A 1-device mesh is the ordinary single-host
case and costs nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The one rule for which axis is a stacked layer axis lives with the other parameter-path rules.
from var_jax.models.decay import stacked_layer_axis

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes; the one given as -1 takes every remaining device."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == -1:
            other = fsdp if name == "data" else data
            if other < 1 or num_devices % other:
                raise ValueError(f"mesh: expected mesh.{'fsdp' if name == 'data' else 'data'} "
                                 f"to divide the {num_devices} devices, found {other}")
    data = num_devices // fsdp if data == -1 else data
    fsdp = num_devices // data if fsdp == -1 else fsdp
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(f"mesh: expected mesh.data x mesh.fsdp = {num_devices} devices, found "
                         f"mesh.data={mesh_config.data} mesh.fsdp={mesh_config.fsdp}")
    return data, fsdp


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over every device of every process (or `devices`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int,
               skip_leading: bool = False) -> P:
    """Splits the largest evenly divisible dimension over "fsdp" (never dim 0 when
    `skip_leading`, the layer axis); arrays under `min_size` elements stay replicated."""
    if fsdp_size == 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    dims = range(1 if skip_leading else 0, len(shape))
    for dim in sorted(dims, key=lambda d: (-shape[d], d)):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh, min_size: int):
    """NamedShardings for a train-state pytree (parameters, optimizer moments, scalars)."""
    fsdp_size = mesh.shape["fsdp"]

    def rule(path, x):
        spec = param_spec(tuple(x.shape), fsdp_size, min_size, stacked_layer_axis(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(rule, abstract_state)


def check_local_batch(batch_size: int, mesh) -> int:
    """The per-process batch of a global `batch_size`; raises naming the problem otherwise."""
    processes = jax.process_count()
    local_devices = mesh.devices.size // processes
    if batch_size % processes or (batch_size // processes) % local_devices:
        raise ValueError(f"batch_size: expected a global batch that splits into {processes} "
                         f"per-process batches each divisible by the {local_devices} local "
                         f"devices, found {batch_size}")
    return batch_size // processes


def put_batch(batch: dict, mesh) -> dict:
    """Host (per-process) numpy batch -> global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    local_devices = mesh.devices.size // jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ValueError(f"batch: expected a per-process batch divisible by "
                             f"{local_devices} local devices, found {x.shape[0]}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def replicate(tree, mesh):
    """Host or device arrays -> copies replicated on every device of the mesh (all processes).

    Each process supplies its own copy of the same values, so this works across processes where
    a device_put of a committed single-device array would not.
    """
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def gather_replicated(tree, mesh):
    """Sharded arrays -> the same arrays replicated on every device of the mesh: a jitted
    all-gather, so it works when the shards live in several processes."""
    shardings = jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def per_device_bytes(tree) -> tuple[int, int]:
    """(largest bytes any one device holds, total bytes of the arrays) of a sharded pytree."""
    per_device: dict = {}
    total = 0
    for x in jax.tree.leaves(tree):
        total += x.size * x.dtype.itemsize
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0), total
