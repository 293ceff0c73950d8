"""The ablation study (paper Table 5): each ``config.ablation.variants`` entry (and each of
``config.ablation.extra``) is the main
config with its overrides applied; it shares the recommender, the backbone and the
attacked catalogues with the main run and retrains (or restores) only the defence stages,
under ``<workdir>/ablations/<name>/``. Leading stages the variant's overrides cannot change
(``no_detector``'s denoiser stages, say) are adopted from the main run instead of trained
again (:func:`jaxvars.training.defense.adopt_stages`)."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import logging

from jaxvars import atomic
from jaxvars.evaluation import summary
from jaxvars.experiment import with_detector_encoder
from jaxvars.overrides import ablation_variants, apply_overrides, without_ablations
from jaxvars.run import ARTIFACTS_FILE, RESULTS_FILE, attack_cache, evaluate_run
from jaxvars.training import defense


def _ranks(workdir: str) -> dict:
  path = os.path.join(workdir, ARTIFACTS_FILE)
  if not os.path.exists(path):
    return {}
  with np.load(path) as art:
    return {k.removeprefix("ranks/"): art[k] for k in art.files if k.startswith("ranks/")}


def compare_to_main(config, main: dict, variant: dict) -> dict:
  """{row: {metric: paired difference}}: each of the variant's rows against the main run's
  same row, on the same users (95% bootstrap intervals)."""
  e = config.eval
  return {row: summary.comparison(r, main[row], tuple(e.ks), resamples=int(e.bootstrap_resamples),
                                  seed=int(e.bootstrap_seed))
          for row, r in variant.items() if row in main}


def run_ablations(exp, consts: dict, rec_params, workdir: str, *, train: bool) -> dict:
  """Trains (``train=True``; resuming) or restores every ablation variant and evaluates it
  on clean images and on ``config.ablation.attacks`` at ``config.ablation.eps`` with the
  defended systems (the paper's Table 5: transfer attacks only; the adaptive and targeted
  attacks of the main run are not repeated per variant); detection only where its stages
  trained the detector with a contrastive term.

  Returns:
    {name: {'overrides', 'ranking', 'ranking_unseen', 'detection', 'comparisons' (each row
    against the main run's, paired over users), 'stages' and 'adopted_stages' (the stages
    taken from the main run; train only), 'timing'}}; each is
    also written to ``<workdir>/ablations/<name>/results.json``.

  Raises:
    ConfigError: an override naming no field or changing the shared models (see
      ``configuration.validate``). CheckpointError (``train=False``): a missing stage.
  """
  out = {}
  for name, overrides in ablation_variants(exp.config).items():
    t = time.perf_counter()
    cfg = apply_overrides(exp.config, overrides, where=f"config.ablation.variants.{name}")
    cfg = without_ablations(cfg)
    if "adaptive" in cfg.attack:
      cfg.attack.adaptive.eps = ()
    if "targeted" in cfg:
      cfg.targeted.num_targets = 0
    sub = os.path.join(workdir, "ablations", name)
    os.makedirs(sub, exist_ok=True)
    logging.info("ablation %s: %s", name, ", ".join(overrides))
    ab = dataclasses.replace(exp, config=cfg, workdir=sub, timing={}, models=dataclasses.replace(
        exp.models, detector_encoder=bool(cfg.detector.train_encoder)))
    params = with_detector_encoder(dict(exp.params, recommender=rec_params),
                                   consts["backbone"], cfg)
    history, adopted = None, []
    if train:
      main_params = dict(exp.params, recommender=rec_params)
      adopted = defense.adopt_stages(
          exp, main_params, workdir, ab, sub,
          lambda p, cfg=cfg: with_detector_encoder(p, consts["backbone"], cfg))
      params, history, seconds = defense.train_defense(ab, consts, params, sub)
      ab.timing.update({f"stage_{k}_s": v for k, v in seconds.items()})
    else:
      params = defense.restore_stages(ab, params, sub)
    res = evaluate_run(ab, params, consts, eval_eps=(cfg.ablation.eps,),
                       methods=tuple(cfg.ablation.attacks), only_trained=True,
                       cache_dir=attack_cache(exp.config, workdir))
    res["timing"]["total_s"] = time.perf_counter() - t
    row = {"overrides": list(overrides), "ranking": res["ranking"],
           "ranking_unseen": res["ranking_unseen"], "detection": res["detection"],
           "comparisons": compare_to_main(cfg, _ranks(workdir), _ranks(sub)),
           "timing": res["timing"]}
    if history is not None:
      row["stages"] = history
      row["adopted_stages"] = adopted
    atomic.write_json(os.path.join(sub, RESULTS_FILE), dict(row, config=cfg.to_dict()))
    out[name] = row
  return out
