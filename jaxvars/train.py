"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and ``evaluate(config, workdir)``.

Stages (paper 4.3):

1. data: prepare the tfds tables, binarise, filter, leave-one-out split (stored in
   ``<workdir>/split.npz``);
2. item features: the frozen ResNet (eval mode) over every item image, once;
3. VBPR: BPR training with one jitted step sharded over the ``data`` mesh axis;
4. the defence: every entry of ``config.stages`` in order (denoiser on clean + FGSM,
   denoiser on clean : FGSM : PGD, detector, joint fine-tuning), all run by the same
   joint step (``steps.make_defense_step``) with the stage's trainable mask, input mix
   and loss terms, jitted once per stage;
5. evaluation: attacks on the whole catalogue for every eps, ranking of every system
   under every condition, detection, written to ``<workdir>/results.json``.

Every stage checkpoints with Orbax under ``<workdir>/checkpoints/<stage>`` and is
resumed (or skipped, when finished) on the next run in the same workdir.
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
from jaxvars.features import FeatureExtractor, feature_stats
from jaxvars.models.denoiser import Denoiser
from jaxvars.models import pretrained
from jaxvars.models.detector import ProjectionHead
from jaxvars.models.resnet import make_resnet
from jaxvars.models.vars import VisualRecommender, normalize_features
from jaxvars.models.vbpr import VBPR
from jaxvars.progress import progress

RESULTS_FILE = "results.json"
ARTIFACTS_FILE = "artifacts.npz"  # Detector scores, embeddings and sample images, for figures.


@dataclasses.dataclass
class Experiment:
  """Everything a run builds before training.

  Attributes:
    system: the flax modules, composed (static).
    params: {'vbpr', 'denoiser', 'detector': {'head'}} initial parameters (replicated).
    backbone_vars: the frozen ResNet's {'params', 'batch_stats'} (replicated).
    holdout: item indices never used to train the defence (detection is evaluated on them).
    pool: the other items (defence training). calibration: clean items of the pool that
      set the detection threshold.
  """
  config: ml_collections.ConfigDict
  data: pipeline.RecData
  mesh: jax.sharding.Mesh
  system: VisualRecommender
  backbone_vars: dict
  params: dict
  vbpr_steps_per_epoch: int
  holdout: np.ndarray
  pool: np.ndarray
  calibration: np.ndarray
  timing: dict
  workdir: str | None = None


def make_optimizer(vbpr_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """VBPR's Optax optimiser with the paper's schedule: lr, then lr * lr_drop_factor for the
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
  """Validates the config, loads the data and initialises every model."""
  configuration.validate(config)
  timing = {}
  t = time.perf_counter()
  data = pipeline.load(config.data, workdir)
  timing["data_s"] = time.perf_counter() - t
  mesh = sharding.make_mesh(config.num_devices)
  for what, size in (("config.vbpr.batch_size", config.vbpr.batch_size),
                     ("config.defense.batch_size", config.defense.batch_size),
                     ("config.attack.batch_size", config.attack.batch_size)):
    sharding.check_divisible(size, mesh, what)
  k_backbone, k_vbpr, k_denoiser, k_head = jax.random.split(jax.random.key(config.seed), 4)
  s = config.data.image_size
  image = jnp.zeros((1, s, s, 3), jnp.float32)
  if config.backbone.init.startswith(("pretrained:", "self_supervised:")):
    kind, path = config.backbone.init.split(":", 1)
    if kind == "self_supervised":  # A configs/pretrain.py workdir: its exported backbone.
      path = os.path.join(path, "backbone")
    backbone, backbone_vars = pretrained.load_pretrained(
        path, arch=config.backbone.arch, width=config.backbone.width,
        small_stem=config.backbone.small_stem)
  else:
    backbone = make_resnet(config.backbone.arch, width=config.backbone.width,
                           small_stem=config.backbone.small_stem)
    backbone_vars = jax.jit(backbone.init)(k_backbone, image)
  vbpr = VBPR(num_users=data.num_users, num_items=data.num_items,
              feature_dim=backbone.feature_dim, factors=config.vbpr.factors,
              visual_factors=config.vbpr.visual_factors, form=config.vbpr.form,
              init_scale=config.vbpr.init_scale)
  dn = config.denoiser
  denoiser = Denoiser(channels=dn.channels, num_blocks=dn.num_blocks, patch=dn.patch,
                      attn_dim=dn.attn_dim, heads=dn.heads)
  head = ProjectionHead(hidden=config.detector.hidden, out=config.detector.dim)
  feature = jnp.zeros((1, backbone.feature_dim))
  index = jnp.zeros((1,), jnp.int32)
  params = {"vbpr": vbpr.init(k_vbpr, index, index, feature)["params"],
            "denoiser": jax.jit(denoiser.init)(k_denoiser, image)["params"],
            "detector": {"head": head.init(k_head, feature)["params"]}}
  system = VisualRecommender(backbone=backbone, vbpr=vbpr, denoiser=denoiser, head=head,
                             feature_norm=config.backbone.feature_norm,
                             rand_min_scale=dn.rand_min_scale, rand_pad=dn.rand_pad)
  rng = np.random.default_rng([config.seed, 7])
  order = rng.permutation(data.num_items)
  n_hold = min(config.detector.holdout_items, data.num_items // 4)
  holdout, pool = np.sort(order[:n_hold]), np.sort(order[n_hold:])
  calibration = np.sort(rng.choice(pool, min(config.detector.calibration_items, len(pool)),
                                   replace=False))
  repl = sharding.replicated(mesh)
  return Experiment(config, data, mesh, system, jax.device_put(backbone_vars, repl),
                    jax.device_put(params, repl),
                    max(1, -(-len(data.train_users) // config.vbpr.batch_size)),
                    holdout, pool, calibration, timing, workdir)


def make_consts(exp: Experiment, backbone_vars=None) -> dict:
  """{'backbone', 'stats', 'features'}: the frozen backbone, the clean catalogue's feature
  statistics and its normalised feature table [I, F], replicated on the mesh."""
  backbone_vars = exp.backbone_vars if backbone_vars is None else backbone_vars
  extractor = FeatureExtractor(exp.system.backbone, backbone_vars, exp.mesh,
                               exp.config.backbone.feature_batch_size)
  raw = extractor(exp.data.images)
  stats = feature_stats(raw)
  normed = normalize_features(jnp.asarray(raw), stats, exp.config.backbone.feature_norm)
  return jax.device_put({"backbone": backbone_vars, "stats": stats, "features": normed},
                        sharding.replicated(exp.mesh))


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


def _vbpr_state(exp: Experiment) -> steps.TrainState:
  return jax.device_put(
      steps.TrainState.create(apply_fn=exp.system.vbpr.apply, params=exp.params["vbpr"],
                              tx=make_optimizer(exp.config.vbpr, exp.vbpr_steps_per_epoch)),
      sharding.replicated(exp.mesh))


def _check_finite(losses: np.ndarray, where: str, advice: str, mgr) -> None:
  if not np.all(np.isfinite(losses)):
    bad = int(np.argmin(np.isfinite(losses)))
    raise NonFiniteLossError(
        f"non-finite {where} loss ({losses[bad]}) at step {bad + 1} of {len(losses)}; {advice}; "
        f"training stopped; checkpoints saved before stay valid (latest: {mgr.latest_step()}); "
        "no results were written")


def train_vbpr(exp: Experiment, consts: dict, workdir: str):
  """BPR training of VBPR (resumes from ``<workdir>/checkpoints/vbpr``).

  Returns:
    (state, per-epoch history, number of steps run now).
  """
  config = exp.config
  mgr = checkpointing.manager(os.path.join(workdir, "checkpoints", "vbpr"),
                              max_to_keep=config.checkpoint.max_to_keep)
  state, start_epoch = _vbpr_state(exp), 0
  if mgr.latest_step() is not None:
    step, tree = checkpointing.restore_latest(mgr, {"vbpr": state, "backbone": exp.backbone_vars})
    _check_same(tree["backbone"], exp.backbone_vars, mgr)
    state, start_epoch = tree["vbpr"], step // exp.vbpr_steps_per_epoch
    logging.info("VBPR: resuming from checkpoint %d (epoch %d of %d)", step, start_epoch,
                 config.vbpr.epochs)
  bpr_step = steps.make_bpr_step(exp.system.vbpr, exp.mesh, reg=config.vbpr.reg,
                                 reg_visual=config.vbpr.reg_visual)
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  history, n_steps = [], 0
  bar = progress(range(start_epoch, config.vbpr.epochs), desc="VBPR epochs",
                 total=config.vbpr.epochs, initial=start_epoch)
  for epoch in bar:
    triplets = epoch_triplets(exp.data, positive_keys, seed=config.seed, epoch=epoch,
                              batch_size=config.vbpr.batch_size)
    metrics = []
    for k in range(triplets["user"].shape[0]):
      batch = sharding.shard_batch({name: a[k] for name, a in triplets.items()}, exp.mesh)
      state, m = bpr_step(state, batch, consts["features"])
      metrics.append(m)
      n_steps += 1
    metrics = jax.device_get(metrics)
    _check_finite(np.array([m["loss"] for m in metrics]), f"VBPR (epoch {epoch + 1})",
                  f"lower config.vbpr.lr (now {config.vbpr.lr}) or config.vbpr.init_scale", mgr)
    epoch_metrics = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    epoch_metrics["epoch"] = epoch + 1
    if config.eval.every_epochs and (epoch + 1) % config.eval.every_epochs == 0:
      scores = ev.vbpr_candidate_scores(
          exp.system.vbpr, state.params, consts["features"],
          ev.candidate_matrix(exp.data.test_items, exp.data.eval_negatives),
          config.eval.batch_users)
      epoch_metrics.update({f"vbpr/{k}": v for k, v in ev.evaluate_scores(
          scores, tuple(config.eval.ks)).items() if k.endswith("@10")})
    history.append(epoch_metrics)
    bar.set_postfix(loss=f"{epoch_metrics['loss']:.4f}",
                    acc=f"{epoch_metrics['pairwise_accuracy']:.3f}", refresh=False)
    logging.info("VBPR epoch %d/%d %s", epoch + 1, config.vbpr.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in epoch_metrics.items() if k != "epoch"))
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == config.vbpr.epochs:
      checkpointing.save(mgr, int(state.step), {"vbpr": state, "backbone": exp.backbone_vars})
  mgr.close()
  return state, history, n_steps


def stage_names(config) -> list[str]:
  """The defence stages that run (epochs > 0), in config order."""
  return [name for name, stage in config.stages.items() if stage.epochs > 0]


def _stage_plan(exp: Experiment, stage) -> tuple[int, int]:
  per_epoch = exp.config.defense.items_per_epoch or len(exp.pool)
  per_epoch = min(per_epoch, len(exp.pool))
  steps_per_epoch = max(1, per_epoch // exp.config.defense.batch_size)
  return steps_per_epoch, steps_per_epoch * stage.epochs


def _stage_state(exp: Experiment, params: dict, stage) -> steps.TrainState:
  tx = steps.stage_optimizer(tuple(stage.trainable), stage.lr)
  params = jax.tree.map(jnp.copy, params)  # The step donates its state: keep the caller's arrays.
  return jax.device_put(steps.TrainState.create(apply_fn=None, params=params, tx=tx),
                        sharding.replicated(exp.mesh))


def train_defense(exp: Experiment, consts: dict, params: dict, workdir: str):
  """Runs every defence stage of ``config.stages`` with the joint step.

  Returns:
    (params after the last stage, {stage: per-epoch history}, {stage: seconds}).
  """
  config = exp.config
  positive_keys = splits.pair_keys(exp.data.train_users, exp.data.train_items, exp.data.num_items)
  histories, seconds = {}, {}
  for s_index, name in enumerate(stage_names(config)):
    stage = config.stages[name]
    steps_per_epoch, total = _stage_plan(exp, stage)
    state = _stage_state(exp, params, stage)
    mgr = checkpointing.manager(os.path.join(workdir, "checkpoints", name),
                                max_to_keep=config.checkpoint.max_to_keep)
    start = 0
    if mgr.latest_step() is not None:
      start, tree = checkpointing.restore_latest(mgr, {"state": state})
      state = tree["state"]
      logging.info("stage %s: resuming from checkpoint %d of %d steps", name, start, total)
    weights = {term: config.loss[term] for term in stage.terms}
    attack = {"eps": float(config.defense.train_eps), "pgd_steps": config.attack.pgd_steps,
              "pgd_alpha": configuration.pgd_alpha(config.attack, config.defense.train_eps),
              "random_start": bool(config.attack.random_start),
              "eps_choices": tuple(config.defense.get("train_eps_choices", ()) or ()),
              "pgd_alpha_ratio": float(config.attack.get("pgd_alpha_ratio", 0.0))}
    step_fn = steps.make_defense_step(exp.system, exp.mesh, weights=weights,
                                      mix=tuple(stage.mix), attack=attack,
                                      temperature=config.detector.temperature)
    stage_key = jax.random.fold_in(jax.random.key(config.seed), 1000 + s_index)
    history = []
    t = time.perf_counter()
    bar = progress(range(start, total), desc=f"stage {name}", total=total, initial=start)
    epoch_metrics, batches = [], None
    for step in bar:
      epoch, k = divmod(step, steps_per_epoch)
      if batches is None or k == 0 or batches[0] != epoch:
        rng = np.random.default_rng([config.seed, 2000 + s_index, epoch])
        order = rng.permutation(exp.pool)[:steps_per_epoch * config.defense.batch_size]
        batches = (epoch, order.reshape(steps_per_epoch, -1), rng)
      items = batches[1][k]
      triplets = splits.item_triplets(items, train_users=exp.data.train_users,
                                      train_items=exp.data.train_items,
                                      num_users=exp.data.num_users, num_items=exp.data.num_items,
                                      positive_keys=positive_keys,
                                      per_role=config.defense.triplets_per_item, rng=batches[2])
      batch = sharding.shard_batch({"images": exp.data.images[items],
                                    "items": items.astype(np.int32), "triplets": triplets},
                                   exp.mesh)
      state, m = step_fn(state, batch, consts, jax.random.fold_in(stage_key, step))
      epoch_metrics.append(m)
      last_of_epoch = k == steps_per_epoch - 1
      if last_of_epoch or (step + 1) % config.defense.checkpoint_every_steps == 0:
        got = jax.device_get(epoch_metrics)
        _check_finite(np.array([g["loss"] for g in got]), f"stage {name!r}",
                      f"lower config.stages.{name}.lr (now {stage.lr})", mgr)
        checkpointing.save(mgr, step + 1, {"state": state})
        if last_of_epoch:
          row = {key: float(np.mean([g[key] for g in got])) for key in got[0]
                 if key not in ("input_kind", "input_eps")}
          row["inputs"] = {kind: int(sum(int(g["input_kind"]) == i for g in got))
                           for i, kind in enumerate(steps.INPUT_KINDS)}
          eps_seen = [float(g["input_eps"]) for g in got if int(g["input_kind"]) > 0]
          if config.defense.get("train_eps_choices") and eps_seen:
            row["input_eps"] = {f"{e:g}": eps_seen.count(e) for e in sorted(set(eps_seen))}
          row["epoch"] = epoch + 1
          history.append(row)
          logging.info("stage %s epoch %d/%d %s", name, epoch + 1, stage.epochs,
                       " ".join(f"{k_}={v:.4f}" for k_, v in row.items()
                                if isinstance(v, float)))
          bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
          epoch_metrics = []
    mgr.close()
    params = state.params
    histories[name], seconds[name] = history, time.perf_counter() - t
  return params, histories, seconds


def restore_all(exp: Experiment, workdir: str) -> tuple[dict, dict, int]:
  """Restores VBPR and every defence stage's latest checkpoint (for ``--mode=evaluate``).

  Returns:
    (params, backbone_vars, VBPR step).

  Raises:
    CheckpointError: a missing or mismatched checkpoint (named).
  """
  mgr = checkpointing.manager(os.path.join(workdir, "checkpoints", "vbpr"))
  vbpr_step, tree = checkpointing.restore_latest(mgr, {"vbpr": _vbpr_state(exp),
                                                       "backbone": exp.backbone_vars})
  mgr.close()
  params = restore_stages(exp, dict(exp.params, vbpr=tree["vbpr"].params), workdir)
  return params, tree["backbone"], vbpr_step


def restore_stages(exp: Experiment, params: dict, workdir: str) -> dict:
  """Restores every defence stage of ``exp.config`` from ``<workdir>/checkpoints/<stage>``
  on top of ``params``; returns the parameters after the last stage.

  Raises:
    CheckpointError: a missing, unfinished or mismatched stage checkpoint (named).
  """
  for name in stage_names(exp.config):
    stage = exp.config.stages[name]
    mgr = checkpointing.manager(os.path.join(workdir, "checkpoints", name))
    try:
      step, stage_tree = checkpointing.restore_latest(mgr, {"state": _stage_state(exp, params,
                                                                                  stage)})
    except CheckpointError as e:
      raise CheckpointError(f"stage {name!r} in {workdir}: {e}; if the training run skipped or changed this "
                            f"stage, evaluate with the same overrides (e.g. "
                            f"--config.stages.{name}.epochs=0)") from None
    finally:
      mgr.close()
    if step < _stage_plan(exp, stage)[1]:
      raise CheckpointError(f"stage {name!r} stopped at step {step} of {_stage_plan(exp, stage)[1]};"
                            " run --mode=train to finish it")
    params = stage_tree["state"].params
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage and the evaluation, writes ``<workdir>/results.json``; returns it.

  Each stage resumes from (or, finished, restores) its checkpoint in ``workdir``.

  Raises:
    ConfigError, DataError: bad config value or data file (named in the message).
    NonFiniteLossError: a NaN/inf loss; checkpoints already saved stay valid and no
      results file is written.
  """
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  exp = build(config, workdir)
  ev.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
  logging.info("data: %s", json.dumps(exp.data.summary()))
  logging.info("mesh: %d %s device(s)", exp.mesh.size, jax.devices()[0].platform)

  t = time.perf_counter()
  consts = make_consts(exp)
  exp.timing["features_s"] = time.perf_counter() - t

  t = time.perf_counter()
  vbpr_state, vbpr_history, n_steps = train_vbpr(exp, consts, workdir)
  exp.timing["vbpr_train_s"] = time.perf_counter() - t
  exp.timing["vbpr_train_steps"] = n_steps
  params = dict(exp.params, vbpr=vbpr_state.params)

  params, stage_history, stage_seconds = train_defense(exp, consts, params, workdir)
  exp.timing.update({f"stage_{k}_s": v for k, v in stage_seconds.items()})

  results = _evaluate(exp, params, consts)
  results["training"] = {"vbpr": {"epochs": config.vbpr.epochs, "steps": int(vbpr_state.step),
                                  "history": vbpr_history},
                         "stages": stage_history}
  if len(config.ablation.variants):
    results["ablations"] = run_ablations(exp, consts, vbpr_state.params, workdir, train=True)
  results["timing"]["total_s"] = time.perf_counter() - t_start
  results["config"] = config.to_dict()
  _finish(results, workdir)
  return results


def run_ablations(exp: Experiment, consts: dict, vbpr_params, workdir: str, *,
                  train: bool) -> dict:
  """The ablation study (paper Table 5): every ``config.ablation.variants`` entry.

  Each variant is the main config with its overrides applied; it shares VBPR, the
  backbone and the attacked catalogues (``<workdir>/attacks``) with the main run, and
  trains (``train=True``; resuming) or restores its own defence stages under
  ``<workdir>/ablations/<name>/checkpoints``. It is evaluated on clean images and on
  ``config.ablation.attacks`` at ``config.ablation.eps`` with the defended systems;
  detection only where its stages trained the detector with a contrastive term.

  Returns:
    {name: {'overrides', 'ranking', 'detection', 'stages' (train only), 'timing'}};
    each is also written to ``<workdir>/ablations/<name>/results.json``.

  Raises:
    ConfigError: an override naming no field or changing the shared models (see
      ``configuration.validate``). CheckpointError (``train=False``): a missing stage.
  """
  out = {}
  for name, overrides in exp.config.ablation.variants.items():
    t = time.perf_counter()
    cfg = configuration.apply_overrides(exp.config, overrides,
                                        where=f"config.ablation.variants.{name}")
    cfg.ablation.variants = ml_collections.ConfigDict()
    sub = os.path.join(workdir, "ablations", name)
    os.makedirs(sub, exist_ok=True)
    logging.info("ablation %s: %s", name, ", ".join(overrides))
    ab = dataclasses.replace(exp, config=cfg, workdir=sub, timing={})
    params = dict(exp.params, vbpr=vbpr_params)
    history = None
    if train:
      params, history, seconds = train_defense(ab, consts, params, sub)
      ab.timing.update({f"stage_{k}_s": v for k, v in seconds.items()})
    else:
      params = restore_stages(ab, params, sub)
    res = _evaluate(ab, params, consts, eval_eps=(cfg.ablation.eps,),
                    kinds=tuple(cfg.ablation.attacks), include_vbpr=False,
                    cache_dir=_attack_cache(exp, workdir))
    res["timing"]["total_s"] = time.perf_counter() - t
    row = {"overrides": list(overrides), "ranking": res["ranking"],
           "detection": res["detection"], "timing": res["timing"]}
    if history is not None:
      row["stages"] = history
    ev.write_json_atomic(os.path.join(sub, RESULTS_FILE), dict(row, config=cfg.to_dict()))
    out[name] = row
  return out


def _attack_cache(exp: Experiment, workdir: str | None) -> str | None:
  return os.path.join(workdir, "attacks") if workdir and exp.config.attack.cache else None


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores every stage's latest checkpoint in ``workdir`` and recomputes all metrics.

  They equal those of the training run (same split from ``split.npz``, same
  parameters, same seeded attacks). ``results.json`` is rewritten with the
  recomputed tables; its ``training`` and ``config`` sections are kept.

  Raises:
    CheckpointError: no checkpoint in ``workdir``, or one of another model shape.
  """
  t_start = time.perf_counter()
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{workdir}/checkpoints does not exist; run with --mode=train first")
  exp = build(config, workdir)
  params, backbone_vars, step = restore_all(exp, workdir)
  exp.backbone_vars = backbone_vars
  t = time.perf_counter()
  consts = make_consts(exp)
  exp.timing["features_s"] = time.perf_counter() - t
  fresh = _evaluate(exp, params, consts)
  if len(config.ablation.variants):
    fresh["ablations"] = run_ablations(exp, consts, params["vbpr"], workdir, train=False)
  fresh["timing"]["total_s"] = time.perf_counter() - t_start
  path = os.path.join(workdir, RESULTS_FILE)
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    same = all(_without_timing(results.get(k)) == _without_timing(fresh.get(k))
               for k in ("ranking", "detection", "ablations"))
    if same:
      logging.info("restored checkpoints reproduce the training run's metrics exactly")
    else:
      logging.warning("restored checkpoints give metrics that differ from %s", path)
  results.update(fresh)
  results["restored_vbpr_step"] = int(step)
  results.setdefault("config", config.to_dict())
  _finish(results, workdir)
  return results


def _evaluate(exp: Experiment, params: dict, consts: dict, *, eval_eps=None,
              kinds=("fgsm", "pgd"), include_vbpr: bool = True, cache_dir=-1) -> dict:
  # A defended system is evaluated only when a stage trained its parts; detection only
  # when a stage trained the detector with a (non-zero) contrastive term.
  config = exp.config
  trained = {g for name in stage_names(config) for g in config.stages[name].trainable}
  detector_trained = config.loss.contrastive > 0 and any(
      "detector" in config.stages[n].trainable and "contrastive" in config.stages[n].terms
      for n in stage_names(config))
  systems = (("vbpr",) if include_vbpr else ()) + (
      ("defended", "defended_rand") if "denoiser" in trained else ())
  out = ev.evaluate_all(system=exp.system, params=params, consts=consts, data=exp.data,
                        mesh=exp.mesh, config=config, holdout=exp.holdout,
                        calibration=exp.calibration, systems=systems,
                        detect=detector_trained, eval_eps=eval_eps, kinds=kinds,
                        mostpop=include_vbpr,
                        cache_dir=_attack_cache(exp, exp.workdir) if cache_dir == -1 else cache_dir)
  artifacts = out.pop("artifacts")
  if artifacts and exp.workdir:
    _write_npz_atomic(os.path.join(exp.workdir, ARTIFACTS_FILE), artifacts)
  timing = dict(exp.timing, **out.pop("timing"))
  timing.update({f"attack_{k}_s": v["time_s"] for k, v in out["attack"].items()
                 if not v.get("cached")})  # A cached catalogue cost nothing in this run.
  return {"data": dict(exp.data.summary(), defense_holdout_items=int(len(exp.holdout))),
          **out, "timing": timing}


def _without_timing(section):
  """A results section without wall-clock fields (for comparing two runs)."""
  if isinstance(section, dict):
    return {k: _without_timing(v) for k, v in section.items() if k not in ("timing", "time_s",
                                                                          "cached", "stages")}
  return section


def _write_npz_atomic(path: str, arrays: dict) -> None:
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _check_same(restored, current, mgr) -> None:
  same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, current))
  if not same:
    raise CheckpointError(f"the backbone in {mgr.directory} differs from this config's "
                          "(seed or backbone.* changed); use a fresh --workdir")


def _finish(results: dict, workdir: str) -> None:
  ev.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
  print("\nranking\n" + ev.format_ranking_table(results["ranking"]))
  if results.get("detection"):
    print("\ndetection\n" + ev.format_ranking_table(
        {k: {m: v for m, v in row.items() if m != "items"}
         for k, row in results["detection"].items()}))
  print(f"\nresults written to {os.path.join(workdir, RESULTS_FILE)}")
