"""Every system under every condition: the ``ranking``, ``detection`` and ``attack`` tables of
results.json.

Conditions are ``clean`` and one attacked catalogue per attack spec (crafted once against
the undefended recommender, cached, and reused by every system: the paper's threat
model). Systems are registered in :data:`jaxvars.defenses.SYSTEMS`; a system's rows are
``<row name>/<condition>`` (``jaxvars.defenses.row_name``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.conditions import CLEAN, row_key
from jaxvars.defenses import SYSTEMS, UNDEFENDED, row_name
from jaxvars.evaluation.detection import detection_metrics
from jaxvars.evaluation.ranking import (candidate_matrix, candidate_scores, evaluate_scores,
                                        mostpop_scores)
from jaxvars.features import batched_map
from jaxvars.pixels import to_float, to_uint8


def system_features(system_name: str, *, models, params, consts, images: np.ndarray, mesh,
                    batch_size: int, seed: int, config) -> np.ndarray:
  """Normalised features [I, F] of a catalogue (uint8 [I, S, S, 3]) as one registered system
  sees it; a randomised system draws per item from ``fold_in(key(seed), item)`` (the same
  random transform for the same item)."""
  system = SYSTEMS.get(system_name)
  transform = system.make(config)
  base_key = jax.random.key(seed)

  @jax.jit
  def fn(batch):
    x = to_float(batch["images"])
    keys = (jax.vmap(lambda i: jax.random.fold_in(base_key, i))(batch["items"])
            if system.randomized else None)
    return models.features(consts, transform(models, params, x, keys))

  items = np.arange(len(images), dtype=np.int32)
  return batched_map(fn, {"images": images, "items": items}, batch_size=batch_size, mesh=mesh,
                     desc=f"{system_name} features")


def detection_scores(*, models, params, consts, images: np.ndarray, mesh, batch_size: int):
  """Detector scores ||z(x) - z(D(x))|| [N] of uint8 images [N, S, S, 3]."""
  fn = jax.jit(lambda b: models.detection_scores(params, consts, to_float(b["images"])))
  return batched_map(fn, {"images": images}, batch_size=batch_size, mesh=mesh,
                     desc="detector scores")


def systems_table(systems, recommender, config) -> dict:
  """The ``systems`` section of results.json: {row name: {'system', 'label', 'description',
  'settings'}}."""
  out = {}
  for name in systems:
    s = SYSTEMS.get(name)
    out[row_name(name, recommender.name)] = {
        "system": name, "label": s.label or recommender.label, "description": s.description,
        "settings": s.settings(config)}
  return out


def evaluate_all(*, models, params, consts, data, mesh, config, holdout: np.ndarray,
                 calibration: np.ndarray, systems, specs, detect: bool = True,
                 cache_dir: str | None = None, mostpop: bool = True) -> dict:
  """Every table of results.json: ``ranking``, ``detection``, ``attack``, ``systems``, and
  their timing.

  Args:
    systems: names of registered systems to rank. specs: the attacks (one condition each).
    detect: score detection on the ``holdout`` items (never used to train the defence),
      each clean and attacked (a balanced set), with the threshold from the clean
      ``calibration`` items.
    cache_dir: where attacked catalogues are kept (None: not kept).
    mostpop: add the most-popular baseline on clean data.

  Returns:
    {'ranking', 'detection', 'attack', 'systems', 'timing', 'artifacts'}.
  """
  ks = tuple(config.eval.ks)
  bs = config.attack.batch_size
  rec = models.recommender
  cands = candidate_matrix(data.test_items, data.eval_negatives)
  timing = {"ranking_s": 0.0}
  ranking = {}
  if mostpop:
    ranking[row_key("mostpop", CLEAN)] = evaluate_scores(
        mostpop_scores(data.train_items, data.num_items)[cands], ks)
  conditions = [(CLEAN, None)] + [(spec.condition, spec) for spec in specs]
  attack, detection, artifacts = {}, {}, {}
  do_detect = detect and len(conditions) > 1
  if do_detect:
    t = time.perf_counter()
    score = lambda imgs: detection_scores(models=models, params=params, consts=consts,
                                          images=imgs, mesh=mesh, batch_size=bs)
    cal = score(data.images[calibration])
    clean_hold = score(data.images[holdout])
    artifacts = {"detector/calibration_clean": cal, "detector/clean": clean_hold,
                 "holdout_items": np.asarray(holdout, np.int32)}
    timing["detection_s"] = time.perf_counter() - t
  # One attacked catalogue in memory at a time (a cached one is memory-mapped).
  for cond, spec in conditions:
    if spec is None:
      images = data.images
    else:
      images, attack[cond] = cached_attack_catalogue(
          spec, cache_dir=cache_dir, models=models, rec_params=params["recommender"],
          consts=consts, data=data, mesh=mesh, batch_size=bs)
    t = time.perf_counter()
    for sys_name in systems:
      if sys_name == UNDEFENDED and spec is None:
        feats = consts["features"]
      else:
        feats = system_features(sys_name, models=models, params=params, consts=consts,
                                images=images, mesh=mesh, batch_size=bs,
                                seed=config.attack.seed, config=config)
      scores = candidate_scores(rec, params["recommender"], jnp.asarray(feats), cands,
                                config.eval.batch_users)
      ranking[row_key(row_name(sys_name, rec.name), cond)] = evaluate_scores(scores, ks)
    timing["ranking_s"] += time.perf_counter() - t
    if do_detect:
      t = time.perf_counter()
      if spec is not None:
        artifacts[f"detector/{cond}"] = score(images[holdout])
        detection[cond] = detection_metrics(calibration_clean=cal, clean=clean_hold,
                                            adversarial=artifacts[f"detector/{cond}"],
                                            fpr=config.detector.fpr)
        detection[cond]["items"] = int(len(holdout))
      artifacts.update(report_samples(models=models, params=params, consts=consts,
                                      conditions={cond: images}, holdout=holdout))
      timing["detection_s"] += time.perf_counter() - t
    del images
  # Rows grouped by system, conditions in sweep order (the layout of the printed table).
  names = ["mostpop"] + [row_name(s, rec.name) for s in systems]
  order = [row_key(s, c) for s in names for c, _ in conditions]
  ranking = {k: ranking[k] for k in order if k in ranking}
  return {"ranking": ranking, "detection": detection, "attack": attack,
          "systems": systems_table(systems, rec, config), "timing": timing, "artifacts": artifacts}


def report_samples(*, models, params, consts, conditions, holdout, images_per_condition=8,
                   embedded_items=200) -> dict[str, np.ndarray]:
  """Pictures and embeddings for figures: for the first held-out items, each condition's
  uint8 images and their denoised versions; detector embeddings of clean, denoised and
  attacked images of up to ``embedded_items`` held-out items."""
  out = {}
  denoise = jax.jit(lambda x: to_uint8(models.denoise(params, to_float(x))))
  embed = jax.jit(lambda x: models.embed_pooled(
      params, models.backbone_out(consts, to_float(x))["pooled"]))
  shown, embedded = holdout[:images_per_condition], holdout[:embedded_items]
  for cond, images in conditions.items():
    out[f"images/{cond}"] = images[shown]
    out[f"images/{cond}/denoised"] = np.asarray(denoise(images[shown]))
    out[f"embeddings/{cond}"] = np.asarray(embed(images[embedded]))
    if cond == CLEAN:
      out["embeddings/clean/denoised"] = np.asarray(embed(np.asarray(denoise(images[embedded]))))
  return out
