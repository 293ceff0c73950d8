"""The one place that talks to Orbax.

A checkpoint is one pytree (a train state, plus the frozen backbone variables for VBPR)
saved with ``ocp.args.StandardSave`` under ``<directory>/<step>``; train.py uses one
directory per stage, ``<workdir>/checkpoints/<stage>``. Orbax
writes to a temporary directory and renames it when complete, so an interrupted
save never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxvars.errors import CheckpointError


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` (created if absent)."""
  directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mgr: ocp.CheckpointManager, step: int, tree) -> None:
  """Saves ``tree`` as checkpoint ``step`` and waits until it is complete on disk."""
  mgr.save(step, args=ocp.args.StandardSave(tree), force=True)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, like):
  """Restores the latest checkpoint into the structure, shapes and shardings of ``like``.

  Args:
    like: a pytree of arrays (or ShapeDtypeStructs) with the saved structure.

  Returns:
    (step, tree).

  Raises:
    CheckpointError: if the directory holds no checkpoint, or one of another structure.
  """
  step = mgr.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {mgr.directory}; run with --mode=train first")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {step} in {mgr.directory} does not match this config's "
                          f"model ({type(e).__name__}: {str(e)[:500]})") from None
  return step, tree


def save_tree(directory: str, tree) -> None:
  """Saves one pytree (e.g. converted pretrained weights) to ``directory``, atomically."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_tree(directory: str, like):
  """Restores a pytree saved by :func:`save_tree` into the structure of ``like``.

  Raises:
    CheckpointError: the directory's tree does not match ``like``.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(directory), abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{directory} does not hold the expected tree "
                          f"({type(e).__name__}: {str(e)[:500]})") from None
  finally:
    checkpointer.close()


def resume(mgr: ocp.CheckpointManager, like) -> tuple[int, object]:
  """(step, tree) of the latest checkpoint restored into ``like``'s structure, or
  ``(0, like)`` when the directory holds none (a fresh start).

  Raises:
    CheckpointError: a checkpoint of another structure.
  """
  if mgr.latest_step() is None:
    return 0, like
  return restore_latest(mgr, like)
