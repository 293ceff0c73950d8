"""The defence stages (paper 4.3): every entry of ``config.stages`` in order, each run by
the one joint step (:mod:`jaxvars.training.defense_step`) with its trainable mask, input
mix and loss terms, and checkpointed under ``<workdir>/checkpoints/<stage>``."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax.training import train_state

from jaxvars import atomic, checkpointing, distributed, fs, sharding, workdir as wd
from jaxvars.attacks.spec import attack_spec
from jaxvars.data import splits
from jaxvars.errors import CheckpointError
from jaxvars.progress import progress
from jaxvars.training import records
from jaxvars.training.common import check_finite
from jaxvars.training.defense_step import (INPUT_KINDS, OTHER_IMAGES, loss_weights,
                                           make_defense_step, needs_other_images, other_items,
                                           stage_optimizer)


def stage_names(config) -> list[str]:
  """The defence stages that run (epochs > 0), in config order."""
  return [name for name, stage in config.stages.items() if stage.epochs > 0]


def stage_plan(exp, stage) -> tuple[int, int]:
  """(steps per epoch, total steps) of a stage over the defence-training pool."""
  per_epoch = exp.config.defense.items_per_epoch or len(exp.pool)
  per_epoch = min(per_epoch, len(exp.pool))
  steps_per_epoch = max(1, per_epoch // exp.config.defense.batch_size)
  return steps_per_epoch, steps_per_epoch * stage.epochs


def _stage_state(exp, params: dict, stage) -> train_state.TrainState:
  tx = stage_optimizer(tuple(stage.trainable), stage.lr)
  params = jax.tree.map(jnp.copy, params)  # The step donates its state: keep the caller's arrays.
  return distributed.put(train_state.TrainState.create(apply_fn=None, params=params, tx=tx),
                        sharding.replicated(exp.mesh))


def _epoch_row(got: list, train_eps_choices) -> dict:
  row = {key: float(np.mean([g[key] for g in got])) for key in got[0]
         if key not in ("input_kind", "input_eps")}
  row["inputs"] = {kind: int(sum(int(g["input_kind"]) == i for g in got))
                   for i, kind in enumerate(INPUT_KINDS)}
  eps_seen = [float(g["input_eps"]) for g in got if int(g["input_kind"]) > 0]
  if train_eps_choices and eps_seen:
    row["input_eps"] = {f"{e:g}": eps_seen.count(e) for e in sorted(set(eps_seen))}
  return row


def _scalars(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items() if k not in ("input_kind", "input_eps")}


def train_defense(exp, consts: dict, params: dict, workdir: str, *, writer=None):
  """Runs every defence stage of ``config.stages`` with the joint step (resuming).

  Each step's triplets come from a generator seeded by (seed, stage, epoch, step), so a
  stage resumed from any checkpoint continues exactly as an uninterrupted run would.

  Args:
    writer: a :class:`jaxvars.metrics.MetricWriter` (every step's losses).

  Returns:
    (params after the last stage, {stage: per-epoch history}, {stage: seconds}), histories
    and seconds over every run that trained the stage.
  """
  config = exp.config
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  histories, seconds = {}, {}
  choices = tuple(config.defense.get("train_eps_choices", ()) or ())
  attack = attack_spec(config.attack, "pgd", config.defense.train_eps, objective="bpr")
  names = stage_names(config)
  for s_index, name in enumerate(names):
    stage = config.stages[name]
    steps_per_epoch, total = stage_plan(exp, stage)
    directory = wd.checkpoint_dir(workdir, name)
    fields = records.stage_fields(config, name, names[:s_index + 1])
    inputs = records.stage_inputs(exp.inputs, workdir, name, names[:s_index + 1],
                                  exp.recommender_workdir)
    mgr = checkpointing.manager(directory, max_to_keep=config.checkpoint.max_to_keep)
    start, tree = checkpointing.resume(mgr, {"state": _stage_state(exp, params, stage)})
    state = tree["state"]
    record = records.load(directory) or {}
    history = [r for r in record.get("history", []) if r["epoch"] * steps_per_epoch <= start]
    partial = record.get("partial", {})
    epoch_metrics = (partial.get("steps", []) if partial.get("step") == start
                     and start % steps_per_epoch else [])
    elapsed0, t = float(record.get("seconds", 0.0)) if start else 0.0, time.perf_counter()
    recorded = elapsed0  # Training seconds as the record holds them (what a rerun reports).
    if start:
      logging.info("stage %s: resuming from checkpoint %d of %d steps", name, start, total)
    weights = loss_weights(config.loss, stage.terms)
    bpr_other = config.defense.get("bpr_other", "clean")
    with_others = needs_other_images(weights, bpr_other)
    step_fn = make_defense_step(exp.models, exp.mesh, weights=weights,
                                mix=tuple(stage.mix), attack=attack, eps_choices=choices,
                                temperature=config.detector.temperature, bpr_other=bpr_other)
    stage_key = jax.random.fold_in(jax.random.key(config.seed), 1000 + s_index)
    bar = progress(range(start, total), desc=f"stage {name}", total=total, initial=start)
    order, written, first_loss = None, len(epoch_metrics), None
    for step in bar:
      epoch, k = divmod(step, steps_per_epoch)
      if order is None or order[0] != epoch:
        perm = np.random.default_rng([config.seed, 2000 + s_index, epoch]).permutation(exp.pool)
        order = (epoch, perm[:steps_per_epoch * config.defense.batch_size].reshape(
            steps_per_epoch, -1))
      items = order[1][k]
      triplets = splits.item_triplets(
          items, train_users=exp.data.train_users, train_items=exp.data.train_items,
          num_users=exp.data.num_users, num_items=exp.data.num_items,
          positive_keys=positive_keys, per_role=config.defense.triplets_per_item,
          rng=np.random.default_rng([config.seed, 2000 + s_index, epoch, k]))
      batch = {"images": exp.data.images[items], "items": items.astype(np.int32),
               "triplets": triplets}
      if with_others:  # The other item of each triplet, through D in the BPR term.
        batch[OTHER_IMAGES] = exp.data.images[other_items(triplets)]
      batch = sharding.shard_batch(batch, exp.mesh)
      state, m = step_fn(state, batch, consts, jax.random.fold_in(stage_key, step))
      epoch_metrics.append(m)
      last_of_epoch = k == steps_per_epoch - 1
      if last_of_epoch or (step + 1) % config.defense.checkpoint_every_steps == 0:
        got = [jax.tree.map(float, g) for g in jax.device_get(epoch_metrics)]
        epoch_metrics = got
        if first_loss is None:  # The divergence bound's reference: where this run started.
          first_loss = got[0]["loss"]
        check_finite([g["loss"] for g in got], where=f"stage {name!r}",
                     advice=f"lower config.stages.{name}.lr (now {stage.lr})",
                     latest_checkpoint=mgr.latest_step(), reference=first_loss)
        if writer is not None:  # epoch_metrics holds this epoch's steps from its first one.
          for j in range(written, len(got)):
            writer.scalars(name, epoch * steps_per_epoch + j + 1, _scalars(got[j]))
        written = len(got)
        if last_of_epoch:
          row = _epoch_row(got, choices)
          row["epoch"] = epoch + 1
          history.append(row)
          logging.info("stage %s epoch %d/%d %s", name, epoch + 1, stage.epochs,
                       " ".join(f"{k_}={v:.4f}" for k_, v in row.items()
                                if isinstance(v, float)))
          bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
          epoch_metrics, written = [], 0
        recorded = elapsed0 + time.perf_counter() - t
        records.save(directory, fields=fields, history=history, done=step + 1 == total,
                     seconds=recorded, inputs=inputs)
        if epoch_metrics:  # Mid-epoch: keep this epoch's steps for a resumed run's row.
          record_partial(directory, step + 1, epoch_metrics)
        checkpointing.save(mgr, step + 1, {"state": state})
    mgr.close()
    params = state.params
    histories[name] = history
    seconds[name] = recorded
  return params, histories, seconds


def record_partial(directory: str, step: int, steps: list) -> None:
  """Adds the metrics of the current epoch's steps so far to the stage's record."""
  path = fs.join(directory, records.RECORD)
  with fs.open(path) as f:
    record = json.load(f)
  record["partial"] = {"step": step, "steps": steps}
  atomic.write_json(path, record)


def restore_stages(exp, params: dict, workdir: str) -> dict:
  """Restores every defence stage of ``exp.config`` from ``<workdir>/checkpoints/<stage>``
  on top of ``params``; returns the parameters after the last stage.

  Raises:
    CheckpointError: a missing, unfinished or mismatched stage checkpoint (named).
  """
  for name in stage_names(exp.config):
    stage = exp.config.stages[name]
    mgr = checkpointing.manager(wd.checkpoint_dir(workdir, name))
    try:
      step, stage_tree = checkpointing.restore_latest(
          mgr, {"state": _stage_state(exp, params, stage)})
    except CheckpointError as e:
      raise CheckpointError(f"stage {name!r} in {workdir}: {e}; if the training run skipped or "
                            "changed this stage, evaluate with the same overrides (e.g. "
                            f"--config.stages.{name}.epochs=0)") from None
    finally:
      mgr.close()
    total = stage_plan(exp, stage)[1]
    if step < total:
      raise CheckpointError(f"stage {name!r} stopped at step {step} of {total}; run "
                            "--mode=train to finish it")
    params = stage_tree["state"].params
  return params


def adopt_stages(src_exp, src_params: dict, src_workdir: str, exp, workdir: str,
                 convert) -> list[str]:
  """Gives ``workdir`` the leading defence stages that ``exp`` would train exactly as
  ``src_exp`` already trained them in ``src_workdir`` (an ablation variant and its main run),
  instead of training them again.

  Stage ``i`` is adopted when stages ``0..i-1`` were, its name and step count match, the
  source stage finished, and both configs give it the same
  :func:`records.shaping_fields` (e.g. ``loss.contrastive=0`` leaves the denoiser-only
  stages as they were: they never use that term). Each adopted stage's final parameters,
  mapped by ``convert`` (source params -> ``exp``'s params tree, e.g. adding the detector's
  encoder copy), are saved as a finished checkpoint of ``workdir`` with the source's history
  and a record naming where they came from; :func:`train_defense` then resumes past it and
  :func:`restore_stages` restores it like a trained one. A stage ``workdir`` already holds
  (trained or adopted before) is left as it is.

  Args:
    src_params: the parameters the source's first stage started from.
    convert: callable, source params -> params for ``exp``.

  Returns:
    The adopted stage names, in order.

  Raises:
    CheckpointError: a source stage whose record says finished but whose checkpoint does
      not restore.
  """
  src_names, names = stage_names(src_exp.config), stage_names(exp.config)
  adopted = []
  for i, name in enumerate(names):
    if i >= len(src_names) or src_names[i] != name:
      break
    stage = exp.config.stages[name]
    if (records.shaping_fields(exp.config, name, names[:i + 1])
        != records.shaping_fields(src_exp.config, name, src_names[:i + 1])
        or stage_plan(exp, stage) != stage_plan(src_exp, src_exp.config.stages[name])
        or len(exp.pool) != len(src_exp.pool) or np.any(exp.pool != src_exp.pool)):
      break
    src_dir = wd.checkpoint_dir(src_workdir, name)
    src_record = records.load(src_dir)
    if not src_record or not src_record.get("done"):
      break
    mgr = checkpointing.manager(src_dir)
    try:
      _, tree = checkpointing.restore_latest(
          mgr, {"state": _stage_state(src_exp, src_params, src_exp.config.stages[name])})
    finally:
      mgr.close()
    src_params = tree["state"].params
    directory = wd.checkpoint_dir(workdir, name)
    existing = records.load(directory)
    if existing is not None and not existing.get("adopted_from"):
      break  # Trained here (an older version's ablation): keep it and what follows it.
    if existing is None or not records.has_checkpoints(directory):
      # The record first: checkpoints without a record are refused (records.changes), while
      # a record whose checkpoint a kill prevented is completed here on the next run.
      records.save(directory, fields=records.stage_fields(exp.config, name, names[:i + 1]),
                   history=src_record.get("history", []), seconds=0.0, done=True,
                   adopted_from=fs.abspath(src_dir),
                   inputs=records.stage_inputs(exp.inputs, workdir, name, names[:i + 1],
                                               exp.recommender_workdir))
      total = stage_plan(exp, stage)[1]
      mgr = checkpointing.manager(directory, max_to_keep=exp.config.checkpoint.max_to_keep)
      try:
        checkpointing.save(mgr, total, {"state": _stage_state(exp, convert(src_params), stage)})
      finally:
        mgr.close()
      logging.info("stage %s: adopted from %s (same settings; not trained again)", name, src_dir)
    adopted.append(name)
  return adopted
