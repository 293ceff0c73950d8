"""Training of the recommender (paper 4.3: about 100 epochs of BPR, the learning rate
dropped for the last 20; AMR: then 5 adversarial epochs), resumable from
``<workdir>/checkpoints/recommender``.

The recommender owns its loss and stages (:class:`jaxvars.recommenders.TrainingStage`):
training runs them in order, one jitted epoch function per stage, as one run of
``sum(stage.epochs)`` epochs with one optimiser (its schedule and state go on across
stages) and one checkpoint directory, resumable in the middle of any stage.

A recommender fitted in closed form instead (``Recommender.fit``: AlexRank) is fitted once
on the training pairs and the clean table ``consts['features']``, and checkpointed in the
same directory with the same record (no history, no optimiser state), so that resuming,
``--mode=evaluate`` and :func:`restore` treat it as a trained one.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from jaxvars import distributed, checkpointing, losses, sharding, workdir as wd
from jaxvars.data import splits
from jaxvars.errors import CheckpointError, NonFiniteLossError
from jaxvars.progress import progress
from jaxvars.recommenders.base import RESERVED_METRICS
from jaxvars.training import records
from jaxvars.training.common import check_finite

TrainState = train_state.TrainState
CHECKPOINT_DIR = "recommender"
OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}


def make_optimizer(rec_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The recommender's Optax optimiser with the paper's schedule: lr, then
  lr * lr_drop_factor for the last ``lr_drop_epochs`` of ``config.recommender.epochs``
  epochs (paper 4.3). Stages after the first (AMR's adversarial epochs) go on at the
  dropped rate: the boundary is counted in the first stage's epochs."""
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


def bpr_objective(params, batch, features, *, recommender, terms=None):
  """The recommender's training objective on a batch of triplets: BPR (the paper's L_bpr)
  + its weighted L2 terms + the terms of the training stage (``terms``).

  Args:
    params: the recommender's parameters.
    batch: {'user', 'pos', 'neg'}: int32 [B] triplets (u, i, j).
    features: float32 [I, F], normalised item features f; for a recommender that reads
      photos (DVBPR), the catalogue's uint8 photos [I, H, W, 3] instead
      (:meth:`jaxvars.recommenders.Recommender.batch_features`).
    recommender: a :class:`jaxvars.recommenders.Recommender`.
    terms: the stage's :data:`jaxvars.recommenders.LossTerms` (e.g. AMR's adversarial
      term), or None (plain BPR: VBPR, BPR-MF, AMR's first stage).

  Returns:
    (loss, metrics): float32 scalar = mean BPR + the recommender's weighted L2 terms + the
    stage's terms, and {'loss', 'bpr', 'pairwise_accuracy' (fraction of triplets with
    x_ui > x_uj), and one entry per stage term (its weighted value)}.

  Raises:
    ValueError: (at trace time) a stage term named like one of the metrics above.
  """
  u, i, j = batch["user"], batch["pos"], batch["neg"]
  f_i = recommender.batch_features(params, features, i)
  f_j = recommender.batch_features(params, features, j)
  x_uij = recommender.difference(params, u, i, j, f_i, f_j)
  bpr = losses.bpr(pos_scores=x_uij, neg_scores=jnp.zeros_like(x_uij))
  loss = bpr
  for term in recommender.penalty_terms(params, u, i, j):
    loss = loss + term
  extra = {} if terms is None else dict(terms(recommender, params, dict(
      batch, pos_features=f_i, neg_features=f_j), features))
  clash = set(extra) & set(RESERVED_METRICS)
  if clash:
    raise ValueError(f"recommender {recommender.name!r}: stage terms {sorted(clash)} clash "
                     f"with the metrics {RESERVED_METRICS}")
  for name in sorted(extra):
    loss = loss + extra[name]
  return loss, {"loss": loss, "bpr": bpr, "pairwise_accuracy": (x_uij > 0).mean(), **extra}


def _update(state: TrainState, batch, features, recommender, terms=None):
  grads, metrics = jax.grad(bpr_objective, has_aux=True)(state.params, batch, features,
                                                          recommender=recommender, terms=terms)
  return state.apply_gradients(grads=grads), metrics


def make_bpr_step(recommender, mesh, terms=None):
  """Jits one update sharded over ``mesh`` (batch on ``data``, the rest replicated), with
  the stage terms ``terms`` (None: plain BPR; see :func:`bpr_objective`).

  Returns:
    step(state: TrainState, batch: dict of int32 [B], features: float32 [I, F]) ->
    (new_state, metrics dict of float32 scalars). ``state`` is donated.
  """
  step = lambda state, batch, features: _update(state, batch, features, recommender, terms)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def make_epoch_fn(recommender, mesh, terms=None):
  """Jits a whole epoch of updates as one ``jax.lax.scan`` over its steps (no Python
  loop, one dispatch per epoch), the batch axis sharded over the mesh's ``data`` axis;
  ``terms``: the training stage's (None: plain BPR; see :func:`bpr_objective`).

  A recommender with a CNN of its own (``reads_images``: DVBPR) on a CPU backend instead
  runs the epoch's steps from a Python loop of one jitted step each: XLA's CPU runtime
  computes convolution gradients inside a loop (the scan) several times slower than the
  same step outside one (as for PGD, :func:`jaxvars.attacks.linf.pgd`).

  Returns:
    epoch(state, triplets: {'user', 'pos', 'neg'} int32 [steps, B], features [I, F]) ->
    (new_state, metrics dict of float32 [steps]). ``state`` is donated.
  """
  if getattr(recommender, "reads_images", False) and jax.default_backend() == "cpu":
    step = make_bpr_step(recommender, mesh, terms)
    on_data = sharding.batch_sharding(mesh)

    def loop(state, triplets, features):
      rows = []
      for k in range(int(triplets["user"].shape[0])):
        state, m = step(state, distributed.put({n: v[k] for n, v in triplets.items()},
                                              on_data), features)
        rows.append(m)
      return state, jax.tree.map(lambda *v: jnp.stack(v), *rows)

    return loop

  def epoch(state: TrainState, triplets, features):
    return jax.lax.scan(lambda st, batch: _update(st, batch, features, recommender, terms),
                        state, triplets)

  repl = sharding.replicated(mesh)
  steps_on_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding.DATA_AXIS))
  return jax.jit(epoch, in_shardings=(repl, steps_on_data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def training_source(exp, consts: dict) -> jax.Array:
  """What BPR training reads item features from (:meth:`jaxvars.recommenders.Recommender.
  batch_features`): the clean table ``consts['features']`` (float32 [I, F]), or for a
  recommender that embeds the photos itself (DVBPR) the catalogue's uint8 photos
  [I, H, W, 3], replicated on the mesh."""
  if exp.models.recommender.reads_images:
    return distributed.put(exp.data.images, sharding.replicated(exp.mesh))
  return consts["features"]


def stage_plan(recommender, rec_config) -> list:
  """The training stage of every epoch: [TrainingStage] of length = the recommender's total
  epochs (the sum over its :meth:`~jaxvars.recommenders.Recommender.training_stages`)."""
  return [stage for stage in recommender.training_stages(rec_config.epochs)
          for _ in range(stage.epochs)]


def initial_state(exp) -> TrainState:
  """The recommender's fresh train state (replicated on the mesh; a copy of the initial
  parameters, since training donates its state). A fitted recommender's has no optimiser
  (``optax.identity()``: an empty state)."""
  rec = exp.models.recommender
  tx = (optax.identity() if rec.fitted
        else make_optimizer(exp.config.recommender, exp.rec_steps_per_epoch))
  return distributed.put(
      TrainState.create(apply_fn=None, params=jax.tree.map(jnp.copy, exp.params["recommender"]),
                        tx=tx),
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
  """Trains the recommender through its stages (resumes from
  ``<workdir>/checkpoints/recommender``, in the middle of any stage).

  Args:
    exp: the :class:`jaxvars.experiment.Experiment`. consts: {'features', ...}.
    on_epoch_end: optional ``(params, epoch) -> dict`` of extra metrics for the history
      (``config.eval.every_epochs``: the ranking metrics of the run so far).
    writer: a :class:`jaxvars.metrics.MetricWriter` (per-step loss, per-epoch metrics).

  Returns:
    (state, per-epoch history of every run that trained it, number of steps run now,
    training seconds of every run). A history row holds the epoch's mean of every metric
    of :func:`bpr_objective` (its stage's terms included) and 'epoch' (1-based, counted
    over all stages); a recommender of several stages also names the row's 'stage'. A
    fitted recommender (:func:`fit_recommender`): its state (step 0), [], 0 and the fitting
    seconds.
  """
  config, rc = exp.config, exp.config.recommender
  rec = exp.models.recommender
  if rec.fitted:
    return fit_recommender(exp, consts, workdir)
  plan = stage_plan(rec, rc)  # The stage of every epoch.
  total = len(plan)
  multi_stage = len(rec.training_stages(rc.epochs)) > 1
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
                 start_epoch, total)
  source = training_source(exp, consts)
  epoch_fns = {}  # One jitted epoch per stage (equal stages share one), built when it first runs.
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  steps_on_data = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec(
      None, sharding.DATA_AXIS))
  n_steps = 0
  desc = lambda stage: f"{rec.label} {stage.name} epochs" if multi_stage else f"{rec.label} epochs"
  bar = progress(range(start_epoch, total),
                 desc=desc(plan[start_epoch]) if start_epoch < total else f"{rec.label} epochs",
                 total=total, initial=start_epoch)
  triplets, first_loss = None, None
  for epoch in bar:
    stage = plan[epoch]
    if stage not in epoch_fns:
      epoch_fns[stage] = make_epoch_fn(rec, exp.mesh, stage.terms)
    if multi_stage and epoch > start_epoch and plan[epoch - 1] is not stage:
      bar.set_description(desc(stage), refresh=False)  # The next stage starts.
    if triplets is None:
      triplets = epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch,
                                batch_size=rc.batch_size)
    state, metrics = epoch_fns[stage](state, distributed.put(triplets, steps_on_data), source)
    n_steps += triplets["user"].shape[0]
    # The next epoch's triplets are drawn on the host while this epoch runs (async dispatch).
    triplets = (epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch + 1,
                               batch_size=rc.batch_size) if epoch + 1 < total else None)
    metrics = jax.device_get(metrics)
    if first_loss is None:  # The divergence bound's reference: where this run started.
      first_loss = float(np.asarray(metrics["loss"]).reshape(-1)[0])
    check_finite(metrics["loss"], where=f"recommender (epoch {epoch + 1}, stage {stage.name})"
                 if multi_stage else f"recommender (epoch {epoch + 1})",
                 advice=f"lower config.recommender.lr (now {rc.lr}) or "
                        "config.recommender.init_scale", latest_checkpoint=mgr.latest_step(),
                 reference=first_loss)
    row = {k: float(np.mean(v)) for k, v in metrics.items()}
    row["epoch"] = epoch + 1
    if multi_stage:
      row["stage"] = stage.name
    if on_epoch_end is not None:
      row.update(on_epoch_end(state.params, epoch + 1) or {})
    history.append(row)
    numbers = {k: v for k, v in row.items() if k not in ("epoch", "stage")}
    if writer is not None:
      first = int(state.step) - len(metrics["loss"])
      for k, loss in enumerate(metrics["loss"]):
        writer.scalars("recommender_step", first + k + 1, {"loss": float(loss)})
      writer.scalars("recommender", epoch + 1, numbers)
    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['pairwise_accuracy']:.3f}",
                    refresh=False)
    logging.info("recommender epoch %d/%d %s%s", epoch + 1, total,
                 f"({stage.name}) " if multi_stage else "",
                 " ".join(f"{k}={v:.4f}" for k, v in numbers.items()))
    stage_end = epoch + 1 == total or plan[epoch + 1] is not stage
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or stage_end:
      recorded = seconds + time.perf_counter() - t0
      records.save(directory, fields=fields, history=history, done=epoch + 1 == total,
                   seconds=recorded, inputs=exp.inputs)
      checkpointing.save(mgr, int(state.step), {"recommender": state,
                                                "backbone": exp.backbone_vars})
  mgr.close()
  return state, history, n_steps, recorded


def fit_recommender(exp, consts: dict, workdir: str):
  """Fits a recommender without training (``Recommender.fit``: AlexRank) on the training
  pairs and the clean table ``consts['features']``, or restores the fit from
  ``<workdir>/checkpoints/recommender``.

  Like a trained recommender's, the fit is one checkpoint (step 0: a
  :class:`TrainState` of the fitted parameters, without optimiser state, and the backbone
  variables) with its record (fields, inputs, ``history`` [], ``done``, ``seconds``), so a
  rerun restores it, a changed config or input refits it (:mod:`jaxvars.training.records`)
  and :func:`restore` reads it.

  Returns:
    (state, [], 0, fitting seconds as recorded).

  Raises:
    CheckpointError: a checkpoint of another shape or backbone.
    NonFiniteLossError: non-finite fitted parameters (non-finite item features).
  """
  config, rec = exp.config, exp.models.recommender
  directory = wd.checkpoint_dir(workdir, CHECKPOINT_DIR)
  mgr = checkpointing.manager(directory, max_to_keep=config.checkpoint.max_to_keep)
  try:
    if mgr.latest_step() is not None:
      step, tree = checkpointing.restore_latest(mgr, {"recommender": initial_state(exp),
                                                      "backbone": exp.backbone_vars})
      _check_same_backbone(tree["backbone"], exp.backbone_vars, mgr.directory)
      record = records.load(directory) or {}
      logging.info("recommender: %s restored from checkpoint %d (fitted, not trained)",
                   rec.label, step)
      return tree["recommender"], [], 0, float(record.get("seconds", 0.0))
    t0 = time.perf_counter()
    params = rec.fit(exp.params["recommender"], exp.data.train_users, exp.data.train_items,
                     consts["features"])
    leaves = jax.device_get(jax.tree.leaves(params))
    if not all(np.all(np.isfinite(a)) for a in leaves):
      raise NonFiniteLossError(f"{rec.label}: the fitted parameters are not finite (are the "
                               "item features finite?); no checkpoint or results were written")
    state = distributed.put(TrainState.create(apply_fn=None, params=params, tx=optax.identity()),
                           sharding.replicated(exp.mesh))
    seconds = time.perf_counter() - t0
    logging.info("recommender: %s fitted on %d training pairs in %.2f s (no training)",
                 rec.label, len(exp.data.train_users), seconds)
    records.save(directory, fields=records.stage_fields(config, records.RECOMMENDER),
                 history=[], done=True, seconds=seconds, inputs=exp.inputs)
    checkpointing.save(mgr, int(state.step), {"recommender": state,
                                              "backbone": exp.backbone_vars})
    return state, [], 0, seconds
  finally:
    mgr.close()


def training_section(config, rec_history, rec_steps, stage_history, recommender=None) -> dict:
  """results.json's ``training``: every epoch of every stage, over every run.

  ``recommender`` (the run's :class:`jaxvars.recommenders.Recommender`; None reads
  ``config.recommender.epochs`` alone): its epochs are those of all its training stages,
  which a recommender of several (AMR) also lists under ``stages`` ([{'name', 'epochs'}]);
  a recommender fitted instead of trained (AlexRank) has 0 epochs and ``'fitted': True``."""
  rec = {"name": config.recommender.name, "epochs": config.recommender.epochs,
         "steps": int(rec_steps), "history": rec_history}
  if recommender is not None:
    stages = recommender.training_stages(config.recommender.epochs)
    rec["epochs"] = sum(int(s.epochs) for s in stages)
    if recommender.fitted:
      rec["fitted"] = True
    if len(stages) > 1:
      rec["stages"] = [{"name": s.name, "epochs": int(s.epochs)} for s in stages]
  return {"recommender": rec, "stages": stage_history}
