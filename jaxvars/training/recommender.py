"""BPR training of the recommender (paper 4.3: about 100 epochs, the learning rate dropped
for the last 20), resumable from ``<workdir>/checkpoints/recommender``."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from jaxvars import checkpointing, losses, sharding, workdir as wd
from jaxvars.data import splits
from jaxvars.errors import CheckpointError
from jaxvars.progress import progress
from jaxvars.training import records
from jaxvars.training.common import check_finite

TrainState = train_state.TrainState
CHECKPOINT_DIR = "recommender"
OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}


def make_optimizer(rec_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The recommender's Optax optimiser with the paper's schedule: lr, then
  lr * lr_drop_factor for the last ``lr_drop_epochs`` epochs (paper 4.3)."""
  boundary = (rec_config.epochs - rec_config.lr_drop_epochs) * steps_per_epoch
  schedule = optax.piecewise_constant_schedule(
      rec_config.lr, {boundary: rec_config.lr_drop_factor} if rec_config.lr_drop_epochs else {})
  return OPTIMIZERS[rec_config.optimizer](schedule)


def epoch_triplets(data, positive_keys: np.ndarray, *, seed: int, epoch: int,
                   batch_size: int) -> dict[str, np.ndarray]:
  """All BPR triplets of one epoch: every training pair once (shuffled) with a sampled
  negative, padded by wrapping around to a whole number of batches (more than once where
  ``batch_size`` exceeds the number of training pairs).

  Returns:
    {'user', 'pos', 'neg'}: int32 [steps, batch_size].
  """
  rng = np.random.default_rng([seed, epoch])
  n = len(data.train_users)
  steps_ = -(-n // batch_size)
  order = rng.permutation(n)
  order = np.resize(order, steps_ * batch_size)  # Wraps around, as often as a batch needs.
  users, pos = data.train_users[order], data.train_items[order]
  neg = splits.sample_train_negatives(users, data.num_items, positive_keys, rng=rng)
  shape = (steps_, batch_size)
  return {"user": users.reshape(shape), "pos": pos.reshape(shape), "neg": neg.reshape(shape)}


def bpr_objective(params, batch, features, *, recommender):
  """The recommender's BPR objective on a batch of triplets (paper eq. for L_bpr).

  Args:
    params: the recommender's parameters.
    batch: {'user', 'pos', 'neg'}: int32 [B] triplets (u, i, j).
    features: float32 [I, F], normalised item features f.
    recommender: a :class:`jaxvars.recommenders.Recommender`.

  Returns:
    (loss, metrics): float32 scalar = mean BPR + the recommender's weighted L2 terms, and
    {'loss', 'bpr', 'pairwise_accuracy'} (fraction of triplets with x_ui > x_uj).
  """
  u, i, j = batch["user"], batch["pos"], batch["neg"]
  x_uij = recommender.difference(params, u, i, j, features[i], features[j])
  bpr = losses.bpr(pos_scores=x_uij, neg_scores=jnp.zeros_like(x_uij))
  loss = bpr
  for term in recommender.penalty_terms(params, u, i, j):
    loss = loss + term
  return loss, {"loss": loss, "bpr": bpr, "pairwise_accuracy": (x_uij > 0).mean()}


def _update(state: TrainState, batch, features, recommender):
  grads, metrics = jax.grad(bpr_objective, has_aux=True)(state.params, batch, features,
                                                          recommender=recommender)
  return state.apply_gradients(grads=grads), metrics


def make_bpr_step(recommender, mesh):
  """Jits one BPR update sharded over ``mesh`` (batch on ``data``, the rest replicated).

  Returns:
    step(state: TrainState, batch: dict of int32 [B], features: float32 [I, F]) ->
    (new_state, metrics dict of float32 scalars). ``state`` is donated.
  """
  step = lambda state, batch, features: _update(state, batch, features, recommender)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def make_epoch_fn(recommender, mesh):
  """Jits a whole epoch of BPR updates as one ``jax.lax.scan`` over its steps (no Python
  loop, one dispatch per epoch), the batch axis sharded over the mesh's ``data`` axis.

  Returns:
    epoch(state, triplets: {'user', 'pos', 'neg'} int32 [steps, B], features [I, F]) ->
    (new_state, metrics dict of float32 [steps]). ``state`` is donated.
  """

  def epoch(state: TrainState, triplets, features):
    return jax.lax.scan(lambda st, batch: _update(st, batch, features, recommender), state,
                        triplets)

  repl = sharding.replicated(mesh)
  steps_on_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding.DATA_AXIS))
  return jax.jit(epoch, in_shardings=(repl, steps_on_data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def initial_state(exp) -> TrainState:
  """The recommender's fresh train state (replicated on the mesh; a copy of the initial
  parameters, since training donates its state)."""
  return jax.device_put(
      TrainState.create(apply_fn=None, params=jax.tree.map(jnp.copy, exp.params["recommender"]),
                        tx=make_optimizer(exp.config.recommender, exp.rec_steps_per_epoch)),
      sharding.replicated(exp.mesh))


def _check_same_backbone(restored, current, directory) -> None:
  same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored, current))
  if not same:
    raise CheckpointError(f"the backbone in {directory} differs from this config's "
                          "(seed or backbone.* changed); use a fresh --workdir")


def restore(exp, workdir: str):
  """(state, step) of the recommender's latest checkpoint in ``workdir``.

  Raises:
    CheckpointError: none, or one of another shape or backbone.
  """
  mgr = checkpointing.manager(wd.checkpoint_dir(workdir, CHECKPOINT_DIR))
  try:
    step, tree = checkpointing.restore_latest(mgr, {"recommender": initial_state(exp),
                                                    "backbone": exp.backbone_vars})
  finally:
    mgr.close()
  return tree["recommender"], tree["backbone"], step


def train_recommender(exp, consts: dict, workdir: str, *, on_epoch_end=None, writer=None):
  """BPR training of the recommender (resumes from ``<workdir>/checkpoints/recommender``).

  Args:
    exp: the :class:`jaxvars.experiment.Experiment`. consts: {'features', ...}.
    on_epoch_end: optional ``(params, epoch) -> dict`` of extra metrics for the history
      (``config.eval.every_epochs``: the ranking metrics of the run so far).
    writer: a :class:`jaxvars.metrics.MetricWriter` (per-step loss, per-epoch metrics).

  Returns:
    (state, per-epoch history of every run that trained it, number of steps run now,
    training seconds of every run).
  """
  config, rc = exp.config, exp.config.recommender
  directory = wd.checkpoint_dir(workdir, CHECKPOINT_DIR)
  fields = records.stage_fields(config, records.RECOMMENDER)
  mgr = checkpointing.manager(directory, max_to_keep=config.checkpoint.max_to_keep)
  step, tree = checkpointing.resume(mgr, {"recommender": initial_state(exp),
                                          "backbone": exp.backbone_vars})
  state, start_epoch = tree["recommender"], step // exp.rec_steps_per_epoch
  record = records.load(directory) or {}
  # Rows of epochs the restored checkpoint has (a record written just before a checkpoint
  # that never completed may hold one more).
  history = [r for r in record.get("history", []) if r["epoch"] <= start_epoch]
  seconds, t0 = float(record.get("seconds", 0.0)) if step else 0.0, time.perf_counter()
  recorded = seconds  # Training seconds as the record holds them (what a rerun reports).
  if step:
    _check_same_backbone(tree["backbone"], exp.backbone_vars, mgr.directory)
    logging.info("recommender: resuming from checkpoint %d (epoch %d of %d)", step,
                 start_epoch, rc.epochs)
  epoch_fn = make_epoch_fn(exp.models.recommender, exp.mesh)
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  steps_on_data = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec(
      None, sharding.DATA_AXIS))
  n_steps = 0
  bar = progress(range(start_epoch, rc.epochs), desc=f"{exp.models.recommender.label} epochs",
                 total=rc.epochs, initial=start_epoch)
  triplets, first_loss = None, None
  for epoch in bar:
    if triplets is None:
      triplets = epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch,
                                batch_size=rc.batch_size)
    state, metrics = epoch_fn(state, jax.device_put(triplets, steps_on_data), consts["features"])
    n_steps += triplets["user"].shape[0]
    # The next epoch's triplets are drawn on the host while this epoch runs (async dispatch).
    triplets = (epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch + 1,
                               batch_size=rc.batch_size) if epoch + 1 < rc.epochs else None)
    metrics = jax.device_get(metrics)
    if first_loss is None:  # The divergence bound's reference: where this run started.
      first_loss = float(np.asarray(metrics["loss"]).reshape(-1)[0])
    check_finite(metrics["loss"], where=f"recommender (epoch {epoch + 1})",
                 advice=f"lower config.recommender.lr (now {rc.lr}) or "
                        "config.recommender.init_scale", latest_checkpoint=mgr.latest_step(),
                 reference=first_loss)
    row = {k: float(np.mean(v)) for k, v in metrics.items()}
    row["epoch"] = epoch + 1
    if on_epoch_end is not None:
      row.update(on_epoch_end(state.params, epoch + 1) or {})
    history.append(row)
    if writer is not None:
      first = int(state.step) - len(metrics["loss"])
      for k, loss in enumerate(metrics["loss"]):
        writer.scalars("recommender_step", first + k + 1, {"loss": float(loss)})
      writer.scalars("recommender", epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['pairwise_accuracy']:.3f}",
                    refresh=False)
    logging.info("recommender epoch %d/%d %s", epoch + 1, rc.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == rc.epochs:
      recorded = seconds + time.perf_counter() - t0
      records.save(directory, fields=fields, history=history, done=epoch + 1 == rc.epochs,
                   seconds=recorded, inputs=exp.inputs)
      checkpointing.save(mgr, int(state.step), {"recommender": state,
                                                "backbone": exp.backbone_vars})
  mgr.close()
  return state, history, n_steps, recorded
