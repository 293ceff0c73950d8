"""Building a run from its config: the data, the mesh, every model through the registries
(backbone, recommender, denoiser, detector), their initial parameters, and the item split
of the defence (defence training pool, detection holdout, calibration items).

Reading order: ``main`` -> ``run`` -> ``experiment`` -> ``training`` / ``evaluation`` ->
components (``backbones``, ``recommenders``, ``attacks``, ``defenses``, ``data``).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxvars import configuration, distributed, fs, sharding
from jaxvars.backbones import build_backbone, load_backbone, weights, with_dtype
from jaxvars.data import pipeline
from jaxvars.defenses.denoiser import Denoiser
from jaxvars.defenses.detector import ProjectionHead
from jaxvars.features import FeatureExtractor, feature_stats, normalize_features
from jaxvars.models import Models, compute_dtype
from jaxvars.recommenders import build_recommender


@dataclasses.dataclass
class Experiment:
  """Everything a run builds before training.

  Attributes:
    models: the flax modules, composed (static).
    params: {'recommender', 'denoiser', 'detector': {'head'}} initial parameters (replicated).
    backbone_vars: the frozen backbone's {'params', 'batch_stats'} (replicated).
    rec_steps_per_epoch: BPR steps per recommender epoch.
    eval_items: items the defence never trains on (``config.defense.eval_fraction`` of the
      catalogue, at least the detection holdout): users whose held-out item is one of
      them are the out-of-sample ('unseen') group of every defended number.
    holdout: the detection items, a seeded subset of ``eval_items``.
    pool: the other items (defence training). calibration: clean items of the pool that
      set the detection threshold.
    timing: seconds of each phase so far.
    inputs: fingerprints of what the stages train on (:func:`input_fingerprints`: data,
      split, backbone weights), recorded with every stage (:mod:`jaxvars.training.records`).
    recommender_workdir: the workdir whose recommender the defence stages start from (an
      ablation variant's: the main run's); None = ``workdir``.
  """
  config: ml_collections.ConfigDict
  data: pipeline.RecData
  mesh: jax.sharding.Mesh
  models: Models
  backbone_vars: dict
  params: dict
  rec_steps_per_epoch: int
  eval_items: np.ndarray
  holdout: np.ndarray
  pool: np.ndarray
  calibration: np.ndarray
  timing: dict
  workdir: str | None = None
  inputs: dict = dataclasses.field(default_factory=dict)
  recommender_workdir: str | None = None


def build(config: ml_collections.ConfigDict, workdir: str | None) -> Experiment:
  """Validates the config, loads the data and initialises every model.

  Raises:
    ConfigError, DataError, CheckpointError: a bad config value, data file or weights
      file (named in the message).
  """
  configuration.validate(config)
  timing = {}
  t = time.perf_counter()
  data = pipeline.load(config.data, workdir)
  timing["data_s"] = time.perf_counter() - t
  mesh = sharding.make_mesh(config.num_devices)
  for what, size in (("config.recommender.batch_size", config.recommender.batch_size),
                     ("config.defense.batch_size", config.defense.batch_size),
                     ("config.attack.batch_size", config.attack.batch_size)):
    sharding.check_divisible(size, mesh, what)
  if config.backbone.init == "random":
    logging.warning("the backbone %s runs on RANDOM weights (config.backbone.init='random'): "
                    "item features, the perceptual loss and the detector come from an untrained "
                    "network; pass --config.backbone.init=pretrained:<weights file> (README)",
                    config.backbone.arch)
  models, backbone_vars, params = build_models(config, num_users=data.num_users,
                                               num_items=data.num_items)
  eval_items, holdout, pool, calibration = item_split(config, data.num_items)
  repl = sharding.replicated(mesh)
  inputs, _ = input_fingerprints(config, data=data)
  return Experiment(config, data, mesh, models, distributed.put(backbone_vars, repl),
                    distributed.put(params, repl),
                    max(1, -(-len(data.train_users) // config.recommender.batch_size)),
                    eval_items, holdout, pool, calibration, timing, workdir, inputs=inputs)


def build_models(config: ml_collections.ConfigDict, *, num_users: int, num_items: int,
                 shapes_only: bool = False) -> tuple[Models, dict, dict]:
  """Every model of a run through the registries, and its initial parameters.

  Args:
    config: the run's config. num_users, num_items: U, I of its data.
    shapes_only: the parameters as ``jax.ShapeDtypeStruct`` leaves, with nothing
      initialised or loaded (the backbone is built on random weights; the run planner,
      :mod:`jaxvars.planner`, needs only shapes).

  Returns:
    (models, backbone_vars {'params', 'batch_stats'}, params {'recommender', 'denoiser',
    'detector'}), drawn from the keys of ``config.seed``. The backbone, the denoiser and the
    detector head compute in ``config.dtype`` (default 'float32'); every parameter is
    float32 and the same for either dtype.

  Raises:
    ConfigError, CheckpointError: a bad backbone config or weights file.
  """
  k_backbone, k_rec, k_denoiser, k_head = jax.random.split(jax.random.key(config.seed), 4)
  s = config.data.image_size
  image = jnp.zeros((1, s, s, 3), jnp.float32)
  # config.dtype: the backbone, D and the head compute in it; their parameters are float32
  # (initialised and loaded as in float32: the same values), their outputs float32.
  dtype_name = config.get("dtype", "float32")
  dtype = compute_dtype(dtype_name)
  if shapes_only:
    backbone = build_backbone(config.backbone)
    backbone_vars = jax.eval_shape(backbone.init, k_backbone, image)
  else:
    backbone, backbone_vars = load_backbone(config.backbone, image_size=s, key=k_backbone)
  backbone = with_dtype(backbone, dtype, arch=config.backbone.arch)
  recommender = build_recommender(config.recommender, num_users=num_users,
                                  num_items=num_items, feature_dim=backbone.feature_dim)
  dn = config.denoiser
  denoiser = Denoiser(channels=dn.channels, num_blocks=dn.num_blocks, patch=dn.patch,
                      attn_dim=dn.attn_dim, heads=dn.heads, dtype=dtype)
  head = ProjectionHead(hidden=config.detector.hidden, out=config.detector.dim, dtype=dtype)

  def init(denoiser_init):
    return with_detector_encoder(
        {"recommender": recommender.init(k_rec, backbone.feature_dim),
         "denoiser": denoiser_init(k_denoiser, image)["params"],
         "detector": {"head": head.init(k_head, jnp.zeros((1, backbone.feature_dim)))[
             "params"]}}, backbone_vars, config)

  params = (jax.eval_shape(lambda: init(denoiser.init)) if shapes_only
            else init(jax.jit(denoiser.init)))
  models = Models(backbone=backbone, recommender=recommender, denoiser=denoiser, head=head,
                  feature_norm=config.backbone.feature_norm, rand_min_scale=dn.rand_min_scale,
                  rand_pad=dn.rand_pad, detector_encoder=bool(config.detector.train_encoder),
                  dtype=dtype_name)
  return models, backbone_vars, params


def input_fingerprints(config, workdir: str | None = None, data=None) -> tuple[dict, set]:
  """Fingerprints of what every stage of a run trains on (a record's ``inputs``,
  :mod:`jaxvars.training.records`), computed without preparing or loading anything:

  * ``data:<file>``: the source content the prepared tables are named after (the sha256 of
    each CSV, the content fingerprint of ``images/``; :func:`jaxvars.data.pipeline.
    _source_files`, whose photo hashes are remembered per stat in the tfds directory), none
    for generated data (its settings are config fields);
  * ``split.npz``: :func:`records.split_fingerprint` of ``data``'s split, else of
    ``<workdir>/split.npz``;
  * ``weights``: :func:`jaxvars.backbones.weights.content_fingerprint` (None: random).

  Returns:
    (inputs, pending): ``pending`` holds ``'split.npz'`` where neither ``data`` nor a
    readable ``<workdir>/split.npz`` gives the split yet (it is made by
    :func:`jaxvars.data.pipeline.load`).

  Raises:
    ConfigError, DataError: an unknown data.name, a missing manual directory, or
      ``pretrained:imagenet`` weights not installed (as loading them would).
  """
  from jaxvars.training import records
  inputs = {records.DATA_PREFIX + name: digest
            for name, digest in sorted(pipeline._source_files(config.data).items())}
  pending = set()
  if data is not None:
    inputs[records.SPLIT_KEY] = records.split_fingerprint(
        {k: getattr(data, k) for k in records.SPLIT_ARRAYS})
  else:
    split = records.read_split_fingerprint(fs.join(workdir, pipeline.SPLIT_FILE)) if (
        workdir) else None
    if split is None:
      pending.add(records.SPLIT_KEY)
    inputs[records.SPLIT_KEY] = split
  inputs[records.WEIGHTS_KEY] = weights.content_fingerprint(config.backbone.init,
                                                            config.backbone.arch)
  return inputs, pending


def with_detector_encoder(params: dict, backbone_vars: dict, config) -> dict:
  """``params`` with the detector's own trainable copy of the backbone's weights
  (``config.detector.train_encoder``, initialised from the backbone), or without one."""
  detector = {"head": params["detector"]["head"]}
  if config.detector.train_encoder:
    detector["encoder"] = jax.tree.map(jnp.copy, params["detector"].get(
        "encoder", backbone_vars["params"]))
  return dict(params, detector=detector)


def item_split(config, num_items: int):
  """The defence's item split, seeded by ``config.seed``.

  Returns:
    (eval_items, holdout, pool, calibration): sorted int arrays. ``eval_items`` (never
    trained on by the defence): ``config.defense.eval_fraction`` of the items, and at least
    the ``holdout`` (``config.detector.holdout_items``, at most a quarter of the catalogue),
    which is drawn from them; ``pool`` = the rest (defence training); ``calibration``
    (``config.detector.calibration_items``) is drawn from the pool.
  """
  rng = np.random.default_rng([config.seed, 7])
  order = rng.permutation(num_items)
  n_hold = min(config.detector.holdout_items, num_items // 4)
  if n_hold < config.detector.holdout_items:
    logging.warning("config.detector.holdout_items=%d capped to %d (a quarter of the %d-item "
                    "catalogue)", config.detector.holdout_items, n_hold, num_items)
  n_eval = min(max(int(round(config.defense.eval_fraction * num_items)), n_hold), num_items - 1)
  eval_items, pool = np.sort(order[:n_eval]), np.sort(order[n_eval:])
  holdout = np.sort(rng.choice(eval_items, n_hold, replace=False))
  calibration = np.sort(rng.choice(pool, min(config.detector.calibration_items, len(pool)),
                                   replace=False))
  return eval_items, holdout, pool, calibration


def make_consts(exp: Experiment, backbone_vars=None) -> dict:
  """{'backbone', 'stats', 'features'}: the frozen backbone, the clean catalogue's feature
  statistics and its normalised feature table [I, F], replicated on the mesh."""
  backbone_vars = exp.backbone_vars if backbone_vars is None else backbone_vars
  extractor = FeatureExtractor(exp.models.backbone, backbone_vars, exp.mesh,
                               exp.config.backbone.feature_batch_size)
  raw = extractor(exp.data.images)
  stats = feature_stats(raw)
  normed = normalize_features(jnp.asarray(raw), stats, exp.config.backbone.feature_norm)
  return distributed.put({"backbone": backbone_vars, "stats": stats, "features": normed},
                        sharding.replicated(exp.mesh))


def recommender_consts(exp: Experiment, consts: dict, rec_params) -> dict:
  """The constants through which a trained recommender sees the photos: ``consts``
  unchanged for one that reads the frozen backbone's table, or for one that embeds the
  photos with its own network (DVBPR, ``Recommender.reads_images``) ``consts`` with its
  parameters under ``ENCODER_CONSTS`` and ``features`` its embedding float32 [I, F'] of
  the clean catalogue (jitted batches of ``config.backbone.feature_batch_size``), so that
  the attacks, the defences' feature passes and evaluation go through its network with no
  case of their own (:meth:`jaxvars.models.Models.features`).

  Args:
    exp: the experiment whose ``models.recommender`` ``rec_params`` belong to.
    consts: :func:`make_consts`'s. rec_params: the recommender's trained parameters.
  """
  rec = exp.models.recommender
  if not rec.reads_images:
    return consts
  from jaxvars.features import batched_map
  from jaxvars.pixels import to_float
  from jaxvars.recommenders.base import ENCODER_CONSTS
  repl = sharding.replicated(exp.mesh)
  rec_params = distributed.put(rec_params, repl)
  encode = jax.jit(lambda p, batch: rec.encode(p, to_float(batch["images"])))
  table = batched_map(lambda batch: encode(rec_params, batch), {"images": exp.data.images},
                      batch_size=int(exp.config.backbone.feature_batch_size), mesh=exp.mesh,
                      desc=f"{rec.label} item features")
  return dict(consts, **distributed.put({ENCODER_CONSTS: rec_params,
                                        "features": jnp.asarray(table)}, repl))


def backbone_summary(config) -> dict:
  """results.json's ``backbone``: which network made the item features, from what weights,
  at what image size."""
  init = config.backbone.init
  return {"arch": config.backbone.arch, "init": init,
          "weights": "random" if init == "random" else init.partition(":")[0],
          "image_size": int(config.data.image_size)}
