"""The one place that talks to Orbax.

A checkpoint is one pytree (a train state, plus the frozen backbone variables for VBPR)
saved with ``ocp.args.StandardSave`` under ``<directory>/<step>``; the training loops
(:mod:`jaxvars.training`) use one directory per stage, ``<workdir>/checkpoints/<stage>``. Orbax
writes to a temporary directory and renames it when complete, so an interrupted
save never leaves a checkpoint that looks finished. Directories are local paths or any
path Orbax opens through ``etils.epath`` (``gs://...``: Orbax's own GCS support).
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxvars import distributed, fs
from jaxvars.errors import CheckpointError


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` (created if absent)."""
  directory = fs.abspath(directory)  # A gs:// URI as it is: Orbax opens it through epath.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mgr: ocp.CheckpointManager, step: int, tree) -> None:
  """Saves ``tree`` as checkpoint ``step`` and waits until it is complete on disk."""
  mgr.save(step, args=ocp.args.StandardSave(tree), force=True)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, like):
  """Restores the newest intact checkpoint into the structure, shapes and shardings of
  ``like``.

  A step that cannot be read (a truncated or corrupted data file, broken metadata) while an
  older one can is moved aside to ``<step>.corrupt`` with a warning naming it, so a damaged
  disk costs only the lost steps. Nothing is moved when no step restores (e.g. a model of
  another shape).

  Args:
    like: a pytree of arrays (or ShapeDtypeStructs) with the saved structure.

  Returns:
    (step, tree).

  Raises:
    CheckpointError: the directory holds no checkpoint, or none that can be read.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint in {mgr.directory}; run with --mode=train first")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  errors = []
  for step in steps:
    try:
      tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged step.
      first = str(e).splitlines()[0][:300] if str(e) else ""
      errors.append((step, f"{type(e).__name__}: {first}"))
      continue
    for bad, reason in errors:  # Newer steps failed while this one restores: damaged.
      path = fs.join(fs.fspath(mgr.directory), str(bad))
      logging.warning("checkpoint step %d in %s cannot be restored (%s); using step %d and "
                      "moving step %d to %s.corrupt", bad, mgr.directory, reason, step, bad, path)
      if fs.isdir(path) and distributed.is_main():  # One process moves it.
        try:
          fs.replace(path, f"{path}.corrupt")
        except Exception as e:  # pylint: disable=broad-except
          if fs.is_local(path):
            raise
          # gs:// through tf.io.gfile cannot rename a directory: the step stays, and the
          # next restore falls back past it again.
          logging.warning("cannot move %s aside (%s: %s); it stays", path, type(e).__name__, e)
    if errors:
      distributed.barrier("jaxvars.checkpointing corrupt steps moved")
      mgr.reload()
    return step, tree
  raise CheckpointError(
      f"no checkpoint in {mgr.directory} can be restored into this config's model: "
      + "; ".join(f"step {s} ({r})" for s, r in errors) + "; delete the directory to retrain "
      "that stage, or use a fresh --workdir")


def save_tree(directory: str, tree) -> None:
  """Saves one pytree (e.g. converted pretrained weights) to ``directory``, atomically."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(fs.abspath(directory), tree)
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
    return checkpointer.restore(fs.abspath(directory), abstract)
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
