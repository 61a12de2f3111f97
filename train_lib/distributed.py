"""Several processes, one run: JAX's own multi-process runtime (`jax.distributed`).

One process drives the devices of one host; all of them run the same program on the same config and
workdir. `initialize()` starts the runtime, before anything touches a device, when

  * JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID are set: the
    way to start it by hand, e.g. two processes on one machine (on CPU, collectives go through gloo);
  * or the process runs on a cluster JAX detects by itself: a multi-host Cloud TPU slice, a SLURM job
    of several tasks, Open MPI (`mpirun`), where `jax.distributed.initialize()` finds everything.

Each process then reads and packs only its rows of every global batch (`data` splits batches by
`process_index`), and `global_batch` assembles the global array from the processes' rows. Files are
written by process 0 only (lock, configs, metrics, summary); orbax checkpoints are written by all.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_detected() -> bool:
  """A multi-process launcher JAX's cluster detection knows (only when it launched more than one process)."""
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True       # a multi-host Cloud TPU slice
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize() -> bool:
  """Starts `jax.distributed` when the environment asks for it; returns whether it did."""
  given = [k for k in ENV if os.environ.get(k)]
  if given and len(given) != len(ENV):
    raise ValueError(f"multi-process run: set all of {', '.join(ENV)} (got only {', '.join(given)})")
  if given:
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU collectives across processes
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False


def is_primary() -> bool:
  """The process that writes the workdir's files."""
  return jax.process_index() == 0


def global_batch(local: dict, sharding_for) -> dict:
  """This process's rows of a batch -> global arrays (rows of process p follow those of p - 1).

  `sharding_for(ndim)` gives the batch sharding; scalars (loss carries) are the same on every process and
  replicated. With one process this is `jax.device_put` of the whole batch."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = jax.device_put(v, NamedSharding(sharding_for(1).mesh, PartitionSpec()))
    elif jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding_for(v.ndim))
    else:
      out[k] = jax.make_array_from_process_local_data(sharding_for(v.ndim), v)
  return out


def like_params(x, params):
  """A host array as an input next to `params`: replicated over their mesh when the run has several
  processes (a single-device array cannot meet arrays spread over other processes in one jit)."""
  if jax.process_count() == 1:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)
  leaf = next(l for l in jax.tree.leaves(params) if isinstance(getattr(l, "sharding", None), NamedSharding))
  return jax.device_put(np.asarray(x), NamedSharding(leaf.sharding.mesh, PartitionSpec()))


def to_host(x) -> np.ndarray:
  """A global array as numpy on every process (gathered when its shards live on several processes)."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def describe(mesh) -> dict:
  """What summary.json records of the run's topology."""
  return {"process_count": jax.process_count(), "global_devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()}}
