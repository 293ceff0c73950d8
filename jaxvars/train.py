"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and ``evaluate(config, workdir)``.

Stages of this release:

1. data: prepare the tfds tables, binarise, filter, leave-one-out split (stored in
   ``<workdir>/split.npz``);
2. item features: the frozen ResNet (eval mode) over every item image, once;
3. VBPR: BPR training with one jitted step sharded over the ``data`` mesh axis,
   Orbax checkpoints every ``checkpoint.every_epochs`` (training resumes from the
   latest one);
4. evaluation: HR@N / NDCG@N for the most-popular baseline and VBPR, printed and
   written to ``<workdir>/results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxvars import checkpointing, configuration, evaluate as ev, sharding, steps
from jaxvars.data import pipeline, splits
from jaxvars.errors import CheckpointError, NonFiniteLossError
from jaxvars.features import FeatureExtractor, feature_stats, normalize_features
from jaxvars.models.resnet import make_resnet
from jaxvars.models.vbpr import VBPR
from jaxvars.progress import progress

RESULTS_FILE = "results.json"


@dataclasses.dataclass
class Experiment:
  """Everything a run builds before training: data, mesh, models, initial state."""
  config: ml_collections.ConfigDict
  data: pipeline.RecData
  mesh: jax.sharding.Mesh
  backbone: object
  backbone_vars: dict
  vbpr: VBPR
  state: steps.TrainState
  steps_per_epoch: int
  timing: dict


def make_optimizer(vbpr_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Optax optimiser with the paper's schedule: lr, then lr * lr_drop_factor for the
  last ``lr_drop_epochs`` epochs (paper 4.3)."""
  boundary = (vbpr_config.epochs - vbpr_config.lr_drop_epochs) * steps_per_epoch
  schedule = optax.piecewise_constant_schedule(
      vbpr_config.lr, {boundary: vbpr_config.lr_drop_factor} if vbpr_config.lr_drop_epochs else {})
  if vbpr_config.optimizer == "adam":
    return optax.adam(schedule)
  if vbpr_config.optimizer == "adamw":
    return optax.adamw(schedule)
  return optax.sgd(schedule)


def build(config: ml_collections.ConfigDict, workdir: str | None) -> Experiment:
  """Validates the config, loads the data and initialises models and train state."""
  configuration.validate(config)
  timing = {}
  t = time.perf_counter()
  data = pipeline.load(config.data, workdir)
  timing["data_s"] = time.perf_counter() - t
  mesh = sharding.make_mesh(config.num_devices)
  sharding.check_divisible(config.vbpr.batch_size, mesh, "config.vbpr.batch_size")
  key_backbone, key_vbpr = jax.random.split(jax.random.key(config.seed))
  s = config.data.image_size
  backbone = make_resnet(config.backbone.arch, width=config.backbone.width,
                         small_stem=config.backbone.small_stem)
  backbone_vars = jax.jit(backbone.init)(key_backbone, jnp.zeros((1, s, s, 3), jnp.float32))
  vbpr = VBPR(num_users=data.num_users, num_items=data.num_items,
              feature_dim=backbone.feature_dim, factors=config.vbpr.factors,
              visual_factors=config.vbpr.visual_factors, form=config.vbpr.form,
              init_scale=config.vbpr.init_scale)
  steps_per_epoch = max(1, -(-len(data.train_users) // config.vbpr.batch_size))
  params = vbpr.init(key_vbpr, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1, backbone.feature_dim)))["params"]
  state = steps.TrainState.create(apply_fn=vbpr.apply, params=params,
                                  tx=make_optimizer(config.vbpr, steps_per_epoch))
  repl = sharding.replicated(mesh)
  return Experiment(config, data, mesh, backbone, jax.device_put(backbone_vars, repl), vbpr,
                    jax.device_put(state, repl), steps_per_epoch, timing)


def item_features(exp: Experiment, images: np.ndarray | None = None):
  """Normalised item features [I, F] on the mesh (replicated), and the raw stats."""
  extractor = FeatureExtractor(exp.backbone, exp.backbone_vars, exp.mesh,
                               exp.config.backbone.feature_batch_size)
  raw = extractor(exp.data.images if images is None else images)
  stats = feature_stats(raw)
  normed = normalize_features(jnp.asarray(raw), stats, exp.config.backbone.feature_norm)
  return jax.device_put(normed, sharding.replicated(exp.mesh)), stats


def epoch_triplets(data: pipeline.RecData, positive_keys: np.ndarray, *, seed: int, epoch: int,
                   batch_size: int) -> dict[str, np.ndarray]:
  """All BPR triplets of one epoch: every training pair once (shuffled) with a sampled
  negative, padded by wrapping around to a whole number of batches.

  Returns:
    {'user', 'pos', 'neg'}: int32 [steps, batch_size].
  """
  rng = np.random.default_rng([seed, epoch])
  n = len(data.train_users)
  steps_ = -(-n // batch_size)
  order = rng.permutation(n)
  order = np.concatenate([order, order[:steps_ * batch_size - n]])
  users, pos = data.train_users[order], data.train_items[order]
  neg = splits.sample_train_negatives(users, data.num_items, positive_keys, rng=rng)
  shape = (steps_, batch_size)
  return {"user": users.reshape(shape), "pos": pos.reshape(shape), "neg": neg.reshape(shape)}


def checkpoint_tree(exp: Experiment, state) -> dict:
  return {"vbpr": state, "backbone": exp.backbone_vars}


def rank_all(exp: Experiment, params, features) -> dict[str, dict[str, float]]:
  """The ``ranking`` section: most-popular and VBPR on clean images."""
  ks = tuple(exp.config.eval.ks)
  cands = ev.candidate_matrix(exp.data.test_items, exp.data.eval_negatives)
  pop = ev.mostpop_scores(exp.data.train_items, exp.data.num_items)
  vbpr_scores = ev.vbpr_candidate_scores(exp.vbpr, params, features, cands,
                                         exp.config.eval.batch_users)
  return {"mostpop/clean": ev.evaluate_scores(pop[cands], ks),
          "vbpr/clean": ev.evaluate_scores(vbpr_scores, ks)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage and writes ``<workdir>/results.json``; returns the results dict.

  Training resumes from the latest checkpoint in ``<workdir>/checkpoints``.

  Raises:
    ConfigError, DataError: bad config value or data file (named in the message).
    NonFiniteLossError: a NaN/inf loss; the checkpoints already saved stay valid and no
      results file is written.
  """
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  exp = build(config, workdir)
  _write_config(config, workdir)
  logging.info("data: %s", json.dumps(exp.data.summary()))
  logging.info("mesh: %d %s device(s)", exp.mesh.size, jax.devices()[0].platform)

  t = time.perf_counter()
  features, _ = item_features(exp)
  features.block_until_ready()
  exp.timing["features_s"] = time.perf_counter() - t

  mgr = checkpointing.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
  state, start_epoch = exp.state, 0
  if mgr.latest_step() is not None:
    step, tree = checkpointing.restore_latest(mgr, checkpoint_tree(exp, exp.state))
    _check_same_backbone(tree["backbone"], exp.backbone_vars, mgr)
    state, start_epoch = tree["vbpr"], step // exp.steps_per_epoch
    logging.info("resuming from checkpoint %d (epoch %d of %d)", step, start_epoch,
                 config.vbpr.epochs)

  bpr_step = steps.make_bpr_step(exp.vbpr, exp.mesh, reg=config.vbpr.reg,
                                 reg_visual=config.vbpr.reg_visual)
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  history = []
  t = time.perf_counter()
  n_steps = 0
  bar = progress(range(start_epoch, config.vbpr.epochs), desc="VBPR epochs",
                 total=config.vbpr.epochs, initial=start_epoch)
  for epoch in bar:
    triplets = epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch,
                              batch_size=config.vbpr.batch_size)
    metrics = []
    for k in range(triplets["user"].shape[0]):
      batch = sharding.shard_batch({name: a[k] for name, a in triplets.items()}, exp.mesh)
      state, m = bpr_step(state, batch, features)
      metrics.append(m)
      n_steps += 1
    epoch_metrics = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
    losses = np.array([float(m["loss"]) for m in metrics])
    if not np.all(np.isfinite(losses)):
      bad = int(np.argmin(np.isfinite(losses)))
      raise NonFiniteLossError(
          f"non-finite VBPR loss ({losses[bad]}) at epoch {epoch + 1}, step {bad + 1} of "
          f"{len(losses)} (config.vbpr.lr={config.vbpr.lr}, config.vbpr.optimizer="
          f"{config.vbpr.optimizer!r}); training stopped; checkpoints saved before this epoch "
          f"stay valid (latest: {mgr.latest_step()}); no results were written")
    epoch_metrics["epoch"] = epoch + 1
    if config.eval.every_epochs and (epoch + 1) % config.eval.every_epochs == 0:
      epoch_metrics.update({f"vbpr/{k}": v for k, v in rank_all(exp, state.params, features)[
          "vbpr/clean"].items() if k.endswith("@10")})
    history.append(epoch_metrics)
    bar.set_postfix(loss=f"{epoch_metrics['loss']:.4f}",
                    acc=f"{epoch_metrics['pairwise_accuracy']:.3f}", refresh=False)
    logging.info("epoch %d/%d %s", epoch + 1, config.vbpr.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in epoch_metrics.items() if k != "epoch"))
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == config.vbpr.epochs:
      checkpointing.save(mgr, int(state.step), checkpoint_tree(exp, state))
  exp.timing["train_s"] = time.perf_counter() - t
  exp.timing["train_steps"] = n_steps
  exp.timing["train_steps_per_s"] = n_steps / max(exp.timing["train_s"], 1e-9)
  mgr.close()

  t = time.perf_counter()
  ranking = rank_all(exp, state.params, features)
  exp.timing["eval_s"] = time.perf_counter() - t
  exp.timing["total_s"] = time.perf_counter() - t_start
  results = {"data": exp.data.summary(), "ranking": ranking, "timing": exp.timing,
             "training": {"epochs": config.vbpr.epochs, "steps": int(state.step),
                          "history": history},
             "config": config.to_dict()}
  _finish(results, workdir)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the latest checkpoint of ``workdir`` and recomputes the ranking metrics.

  The metrics equal those written by the training run (same split from
  ``split.npz``, same parameters, same features). ``results.json`` is rewritten
  with the recomputed ``ranking`` and ``timing``; other sections are kept.

  Raises:
    CheckpointError: no checkpoint in ``workdir``, or one of another model shape.
  """
  t_start = time.perf_counter()
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{workdir}/checkpoints does not exist; run with --mode=train first")
  exp = build(config, workdir)
  mgr = checkpointing.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
  step, tree = checkpointing.restore_latest(mgr, checkpoint_tree(exp, exp.state))
  mgr.close()
  exp.backbone_vars = tree["backbone"]
  t = time.perf_counter()
  features, _ = item_features(exp)
  exp.timing["features_s"] = time.perf_counter() - t
  t = time.perf_counter()
  ranking = rank_all(exp, tree["vbpr"].params, features)
  exp.timing["eval_s"] = time.perf_counter() - t
  exp.timing["total_s"] = time.perf_counter() - t_start
  path = os.path.join(workdir, RESULTS_FILE)
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results.get("ranking") and results["ranking"] != ranking:
      logging.warning("restored checkpoint %d gives metrics that differ from %s", step, path)
    elif results.get("ranking"):
      logging.info("restored checkpoint %d reproduces the training run's metrics exactly", step)
  results.update({"data": exp.data.summary(), "ranking": ranking, "timing": exp.timing,
                  "restored_step": int(step)})
  results.setdefault("config", config.to_dict())
  _finish(results, workdir)
  return results


def _check_same_backbone(restored, current, mgr) -> None:
  same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, current))
  if not same:
    raise CheckpointError(f"the backbone in {mgr.directory} differs from this config's "
                          "(seed or backbone.* changed); use a fresh --workdir")


def _write_config(config, workdir: str) -> None:
  ev.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())


def _finish(results: dict, workdir: str) -> None:
  ev.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
  print("\n" + ev.format_ranking_table(results["ranking"]))
  print(f"\nresults written to {os.path.join(workdir, RESULTS_FILE)}")
