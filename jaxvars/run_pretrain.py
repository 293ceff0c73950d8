"""The ``pretrain`` task (``configs/pretrain.py``): self-supervised pretraining of the
backbone, then what it buys against a randomly initialised one.

``pretrain_and_evaluate(config, workdir)``:

1. SimCLR on the catalogue's photos (:mod:`jaxvars.training.pretrain`), exported to
   ``<workdir>/backbone`` (``--config.backbone.init=self_supervised:<workdir>``);
2. ``results.json``'s ``backbone`` section: linear-probe accuracy on the item categories
   and (``pretrain.compare_vbpr``) the recommender's ranking metrics, for a random and for
   the pretrained backbone (:func:`backbone_report`).
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxvars import configuration, distributed, fs, sharding, workdir as wd
from jaxvars.data import pipeline
from jaxvars.evaluation.probe import linear_probe
from jaxvars.evaluation.ranking import candidate_matrix, candidate_scores, evaluate_scores
from jaxvars.experiment import build, make_consts, recommender_consts
from jaxvars.features import FeatureExtractor
from jaxvars.training.pretrain import BACKBONE_DIR, pretrain
from jaxvars.training.recommender import train_recommender


def recommender_metrics(config, workdir: str) -> dict:
  """Trains the recommender of ``config`` (joint task, clean data only) in ``workdir`` and
  returns its ranking metrics {'HR@N', 'NDCG@N'}."""
  exp = build(config, workdir)
  consts = make_consts(exp)
  state, _, _, _ = train_recommender(exp, consts, workdir)
  table = recommender_consts(exp, consts, state.params)["features"]
  scores = candidate_scores(exp.models.recommender, state.params, table,
                            candidate_matrix(exp.data.test_items, exp.data.eval_negatives),
                            config.eval.batch_users)
  return evaluate_scores(scores, tuple(config.eval.ks))


def backbone_report(config, data, mesh, workdir, candidates: dict) -> dict:
  """Linear probe (and recommender metrics) for each named backbone in ``candidates``
  ({name: (model, variables, backbone.init of a joint config that loads it)})."""
  out = {}
  for name, (model, variables, init) in candidates.items():
    feats = FeatureExtractor(model, variables, mesh, config.backbone.feature_batch_size)(
        data.images, desc=f"{name} features")
    pr = config.pretrain.probe
    row = {"linear_probe": linear_probe(feats, data.categories, seed=config.seed,
                                        min_per_class=pr.min_per_class,
                                        test_fraction=pr.test_fraction, steps=pr.steps)}
    if config.pretrain.compare_vbpr:
      sub = copy.deepcopy(config)
      sub.unlock()
      sub.task = "joint"
      sub.backbone.init = init
      row["vbpr"] = recommender_metrics(sub, fs.join(workdir, f"vbpr_{name}"))
    out[name] = row
    logging.info("backbone %s: %s", name, row)
  return out


def pretrain_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains, exports the backbone, measures random vs pretrained; writes results.json."""
  configuration.validate(config)
  t_start = time.perf_counter()
  workdir = fs.fspath(workdir)
  fs.makedirs(workdir, exist_ok=True)
  data = pipeline.load(config.data, workdir)
  mesh = sharding.make_mesh(config.num_devices)
  backbone, exported, history, timing = pretrain(config, data, mesh, workdir)
  random_vars = backbone.init(jax.random.split(jax.random.key(config.seed), 3)[0],
                              jnp.zeros((1, config.data.image_size, config.data.image_size, 3)))
  report = backbone_report(config, data, mesh, workdir,
                           {"random": (backbone, random_vars, "random"),
                            "self_supervised": (backbone, exported,
                                                f"self_supervised:{fs.abspath(workdir)}")})
  timing["total_s"] = time.perf_counter() - t_start
  results = {"data": data.summary(), "pretrain": {"history": history},
             "backbone": report, "timing": timing, "config": config.to_dict()}
  path = wd.write_results(workdir, results)
  if not distributed.is_main():  # Process 0 prints for all.
    return results
  print("\nbackbone")
  for name, row in report.items():
    probe = row["linear_probe"]
    line = f"{name:16s} linear probe {probe['accuracy']:.4f} ({probe['classes']} classes, " \
           f"majority {probe['majority_accuracy']:.4f})"
    if "vbpr" in row:
      rec = config.recommender.name  # results.json keeps the key 'vbpr' (the default's).
      line += f"  {rec} HR@10 {row['vbpr']['HR@10']:.4f} NDCG@10 {row['vbpr']['NDCG@10']:.4f}"
    print(line)
  print(f"\nbackbone exported to {fs.join(workdir, BACKBONE_DIR)}; results written to "
        f"{path}")
  return results
