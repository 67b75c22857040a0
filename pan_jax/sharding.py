"""Device mesh, global arrays from per-host batches, multi-host initialisation.

Data parallelism is plain `jax.jit` over a batch sharded on the mesh's `data` axis with the
train state replicated: XLA inserts the gradient all-reduce, and BatchNorm's batch statistics
are computed over the global batch (SyncBN) with no extra code.
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# Environment variables by which a cluster says that this is one process of several.
_CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")
# What `srun` sets for each task of a step, and JAX's SLURM detection reads: a job's allocation
# alone (salloc, an sbatch script's own shell) has SLURM_JOB_ID but runs one process.
_SRUN_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


def initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

    SLURM (an `srun` step of several tasks; a process started in an allocation without `srun`,
    or a one-task step, is left alone), Open MPI and GKE's TPUs are detected by JAX itself. On
    a single machine set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and
    with one process per GPU JAX_LOCAL_DEVICE_IDS (its GPU; without it every process takes
    every GPU), as launch/gpu_single_host.sh does; they win over SLURM's variables. A Cloud
    TPU VM slice describes itself in the GCE metadata server, not in the environment
    (TPU_WORKER_HOSTNAMES is GKE's), so launch/tpu_pod.sh sets PAN_JAX_DISTRIBUTED=1: without
    the distributed client, orbax's multi-host checkpointing and JAX's preemption sync point
    do not work.
    """
    if os.environ.get("PAN_JAX_NO_DISTRIBUTED"):
        return
    forced = os.environ.get("PAN_JAX_DISTRIBUTED") == "1"
    srun_tasks = all(v in os.environ for v in _SRUN_VARIABLES) and (
        int(os.environ["SLURM_NTASKS"]) > 1
    )
    if not (forced or srun_tasks or any(v in os.environ for v in _CLUSTER_VARIABLES)):
        return
    kwargs: dict[str, Any] = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local devices, %d global",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def create_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over all devices of all processes, axis `data`."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 1) -> NamedSharding:
    """Sharding of a batch whose axis `leading_axes` (after micro-batch axes) is the batch."""
    return NamedSharding(mesh, P(*([None] * (leading_axes - 1)), DATA_AXIS))


def global_batch(
    host_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Assembles each process's rows into arrays sharded over all devices of all processes."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in host_batch.items()
    }


class OtherProcessError(RuntimeError):
    """Work that all processes do in turn failed in another one (whose log says why)."""


def process_zero_first(work: Callable[[], Any], done: str) -> None:
    """Runs `work` in process 0, then in the first process of every other host, then in the
    rest: a result on shared storage (a gs:// data_dir, a shared weights cache) is made once and
    found by the others; storage local to each host gets one copy, made by one process (several
    processes of one host, one per GPU, would build into the same folder at once).

    An error in one process is raised in every process (`OtherProcessError` in the others),
    after the round it came in: the others would wait for it at the next round for ever.
    """
    if jax.process_count() == 1:
        work()
        return
    from jax.experimental import multihost_utils

    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF  # an int32: jax's default
    me = jax.process_index()
    pairs = multihost_utils.process_allgather(np.array([host, me], np.int32))
    first_of_host = min(int(p) for h, p in pairs if h == host) == me
    rounds = (me == 0, me != 0 and first_of_host, not first_of_host)
    for mine in rounds:  # who works in each round: process 0; the other hosts' first; the rest
        error = None
        if mine:
            try:
                work()
            except Exception as caught:  # re-raised below, once the others know
                error = caught
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is not None:
            raise error
        if np.any(failed):
            processes = ", ".join(map(str, np.flatnonzero(failed)))
            raise OtherProcessError(
                f"stopped: process {processes} failed where every process waits for '{done}' "
                "(its log says why)"
            )
