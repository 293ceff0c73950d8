"""Multi-controller JAX: one process per host (or per GPU), one global mesh.

A run on several processes is the same program on each (JAX's multi-controller model):
every process calls :func:`initialize` first, builds the same config, split and parameters
(deterministic in the config's seeds), and calls every jitted step; XLA moves the data
between hosts. This module holds the few places where processes differ:

* :func:`initialize` calls ``jax.distributed.initialize`` when the launch asks for it:
  explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` (flags of
  ``jaxvars.main``), or the environment of a Cloud TPU pod slice, a SLURM job of several
  tasks, Open MPI or ``JAX_COORDINATOR_ADDRESS``, which ``jax.distributed.initialize()``
  detects itself.
* :func:`put` builds a global array from the host array every process holds, each process
  transferring only the rows of its own devices (``jax.make_array_from_callback``);
  :func:`to_host` brings a global array back whole to every process
  (``multihost_utils.process_allgather``).
* :func:`is_main`: only process 0 writes the workdir's files (results, report, metrics,
  caches, config, split, the lock); Orbax checkpoints are written by every process
  together. :func:`barrier` makes the others wait for a file process 0 writes.

With one process (the default, and every CPU preset) every function here is the plain
single-process operation, so a one-process run is unchanged bit for bit.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

# Environment variables whose presence (with more than one process) means the launcher
# expects jax.distributed.initialize(): name -> what sets it.
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM (srun)",
    "OMPI_COMM_WORLD_SIZE": "Open MPI (mpirun)",
}


def _cluster_from_env(env) -> str | None:
  """The launcher the environment names, or None for a plain single-process launch."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for var, what in _CLUSTER_ENV.items():
    try:
      if int(env.get(var, "1")) > 1:
        return what
    except ValueError:
      continue
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # A Cloud TPU pod slice: one worker VM per host.
    return "Cloud TPU pod slice (TPU_WORKER_HOSTNAMES)"
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, *, mode: str = "auto", env=None) -> bool:
  """Starts multi-controller JAX if this launch is one of several processes.

  Must run before anything touches a JAX backend (``jax.devices()``, a jitted call).

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator; with it,
      ``num_processes`` and ``process_id`` are required (a launch on localhost or a cluster
      JAX does not detect).
    num_processes, process_id: the number of processes and this one's index in [0, n).
    mode: ``'auto'`` (initialise when the arguments or the environment ask for it),
      ``'on'`` (always: ``jax.distributed.initialize()`` with auto-detection; it raises
      where it detects no cluster), ``'off'`` (never).
    env: the environment to read (default ``os.environ``).

  Returns:
    True when ``jax.distributed.initialize`` was called.

  Raises:
    ValueError: an incomplete explicit launch (an address without ``num_processes`` /
      ``process_id``, or a ``process_id`` outside [0, num_processes)), or an unknown mode.
  """
  env = os.environ if env is None else env
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r} is not 'auto', 'on' or 'off'")
  if mode == "off":
    return False
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address={coordinator_address!r} needs --num_processes "
                       f">= 1 and 0 <= --process_id < --num_processes (got {num_processes} "
                       f"and {process_id})")
    logging.info("jax.distributed: process %d of %d, coordinator %s", process_id,
                 num_processes, coordinator_address)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if num_processes > 1 or process_id >= 0:
    raise ValueError("--num_processes / --process_id need --coordinator_address (host:port "
                     "of process 0)")
  launcher = _cluster_from_env(env)
  if mode == "auto" and launcher is None:
    return False
  logging.info("jax.distributed: initialising from the environment (%s)",
               launcher or "--distributed=on")
  jax.distributed.initialize()
  return True


def process_index() -> int:
  """This process's index in [0, process_count())."""
  return jax.process_index()


def process_count() -> int:
  """How many processes run this program (1 without multi-controller JAX)."""
  return jax.process_count()


def is_main() -> bool:
  """True on process 0, the one process that writes the workdir's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)`` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def put(tree, sharding):
  """A pytree of host arrays, each held whole by every process, as global arrays with
  ``sharding``; each process transfers only the slices of its own devices.

  With one process this is ``jax.device_put(tree, sharding)``.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable is False:
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
  """A jax.Array (or anything array-like) as one numpy array, whole, on every process.

  A global array whose shards live on other processes' devices is gathered
  (``multihost_utils.process_allgather``; every process must call this together).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
