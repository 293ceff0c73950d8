"""Device mesh and shardings: batches split over a 1-D ``data`` axis, parameters replicated.

This is the jit + NamedSharding form of data parallelism (``jax.pmap`` is not used):
the same jitted step runs on 1 device or many; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvars import distributed
from jaxvars.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (0 = all).

  Raises:
    ConfigError: if more devices are asked for than exist.
  """
  devices = jax.devices()
  if num_devices and num_devices > len(devices):
    raise ConfigError(f"config.num_devices={num_devices} but only {len(devices)} "
                      f"{devices[0].platform} device(s) exist")
  return Mesh(np.asarray(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and other arrays every device holds whole."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) dimension over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises ConfigError unless ``batch_size`` splits evenly over the mesh."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ConfigError(f"{what}={batch_size} is not divisible by the {n} devices of the mesh")


def shard_batch(batch, mesh: Mesh):
  """Places a pytree of host arrays [B, ...] on the mesh, split along B."""
  return distributed.put(batch, batch_sharding(mesh))
