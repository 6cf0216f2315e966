"""Multi-process start-up: jax.distributed once, before any device work, from flags or the
standard environment variables, or auto-detected on a TPU pod / under Slurm.

Explicit settings come from the arguments (the scripts' --coordinator_address, --num_processes,
--process_id flags) or else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
With neither, a cluster the JAX runtime knows how to read (TPU pod slice, Slurm job with several
tasks, Open MPI) is initialised with `jax.distributed.initialize()` and no arguments, and a
plain machine stays a single process. On CPU the cross-process collectives go over gloo.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from absl import flags, logging

_DONE: dict = {}


def define_flags(flag_values=flags.FLAGS) -> None:
    """The launch flags every entry point takes (none are needed on one host)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).", **fv)
    flags.DEFINE_integer("num_processes", None,
                         "Number of processes (else $JAX_NUM_PROCESSES).", **fv)
    flags.DEFINE_integer("process_id", None, "This process's index (else $JAX_PROCESS_ID).",
                         **fv)
    flags.DEFINE_integer("initialization_timeout", 300,
                         "Seconds to wait for the coordinator and every process.", **fv)


def initialize_from_flags(flag_values=flags.FLAGS) -> None:
    f = flag_values
    initialize(f.coordinator_address, f.num_processes, f.process_id,
               timeout_s=f.initialization_timeout)


def _cluster_detected() -> bool:
    env = os.environ
    several = lambda name: int(env.get(name, "1") or 1) > 1
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return several("SLURM_NTASKS") or several("OMPI_COMM_WORLD_SIZE") or "," in tpu_hosts


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Raises a clear error if nothing listens at `address` within the timeout (the JAX client
    would abort the process without a Python exception)."""
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise ConnectionError(
                    f"--coordinator_address: no coordinator reachable at {address} within "
                    f"{timeout_s:.0f}s ({e}); start process 0 there, or check the address and "
                    f"--initialization_timeout") from e
            time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
    """Starts jax.distributed once (later calls with the same settings do nothing)."""
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    settings = (address, count, index)
    if _DONE:
        if _DONE["settings"] != settings:
            raise ValueError(f"distributed: already initialised with {_DONE['settings']}, "
                             f"found {settings}")
        return
    if address is None and count is None and index is None:
        if _cluster_detected():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(initialization_timeout=timeout_s)
        _DONE["settings"] = settings
        return
    if address is None or ":" not in address:
        raise ValueError(f"--coordinator_address: expected host:port of process 0, found "
                         f"{address!r}")
    try:
        count, index = int(count), int(index)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--num_processes and --process_id: expected integers with "
                         f"--coordinator_address, found {count!r} and {index!r}") from e
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--process_id: expected 0 <= process_id < num_processes={count}, "
                         f"found {index}")
    if count > 1:
        if index != 0:
            _wait_for_coordinator(address, timeout_s)
        logging.info("distributed: process %d of %d, coordinator %s", index, count, address)
        # CPU devices of several processes talk through gloo (no effect on GPU/TPU clients).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                   process_id=index, initialization_timeout=timeout_s)
    _DONE["settings"] = settings


def is_primary() -> bool:
    """Process 0 alone writes logs, metrics, sample grids and reports."""
    return jax.process_index() == 0
