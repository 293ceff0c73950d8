"""The ablation study (paper Table 5): each ``config.ablation.variants`` entry (and each of
``config.ablation.extra``) is the main
config with its overrides applied; it shares the recommender, the backbone and the
attacked catalogues with the main run and retrains (or restores) only the defence stages,
under ``<workdir>/ablations/<name>/``. Leading stages the variant's overrides cannot change
(``no_detector``'s denoiser stages, say) are adopted from the main run instead of trained
again (:func:`jaxvars.training.defense.adopt_stages`)."""

from __future__ import annotations

import dataclasses
import json
import time

from absl import logging

from jaxvars import fs, workdir as wd
from jaxvars.errors import NonFiniteLossError
from jaxvars.evaluate import attack_cache, evaluate_run
from jaxvars.evaluation import summary
from jaxvars.experiment import with_detector_encoder
from jaxvars.overrides import ablation_variants, apply_overrides, without_ablations
from jaxvars.training import defense

# The defended systems of the ablation table (paper Table 5: OURS, OURS-rand).
TABLE5_SYSTEMS = ("defended", "defended_rand")


def compare_to_main(config, main: dict, variant: dict) -> dict:
  """{row: {metric: paired difference}}: each of the variant's rows against the main run's
  same row, on the same users (95% bootstrap intervals)."""
  e = config.eval
  return {row: summary.comparison(r, main[row], tuple(e.ks), resamples=int(e.bootstrap_resamples),
                                  seed=int(e.bootstrap_seed))
          for row, r in variant.items() if row in main}


def run_ablations(exp, consts: dict, rec_params, workdir: str, *, train: bool,
                  main_ranks: dict) -> dict:
  """Trains (``train=True``; resuming) or restores every ablation variant and evaluates it
  on clean images and on ``config.ablation.attacks`` at ``config.ablation.eps`` with OURS
  and OURS-rand (:data:`TABLE5_SYSTEMS`, where evaluated; the paper's Table 5: transfer attacks only; the adaptive and targeted
  attacks of the main run are not repeated per variant); detection only where its stages
  trained the detector with a contrastive term.

  A variant whose training diverges (a NaN/inf loss: removing a part can do that, as
  ``no_perceptual`` once did) is a finding, not a failure of the run: its row records
  ``'diverged'`` (the error message) and the ablation study goes on with the next variant;
  ``train=False`` carries that row over from the variant's results.json. ``main_ranks``:
  the main run's per-user ranks {row: int [U] or [K, U]} (its evaluation's artifacts,
  :func:`jaxvars.workdir.ranks_of`), which each variant's rows are paired with.

  Returns:
    {name: {'overrides', 'ranking', 'ranking_unseen', 'detection', 'fidelity' (PSNR/SSIM of
    the variant's D, as the main run's), 'comparisons' (each row against the main run's,
    paired over users), 'stages' and 'adopted_stages' (the stages taken from the main run;
    train only), 'timing'}} or, diverged, {name: {'overrides', 'diverged', 'timing'}}; each
    is also written to ``<workdir>/ablations/<name>/results.json``.

  Raises:
    ConfigError: an override naming no field or changing the shared models (see
      ``configuration.validate``). CheckpointError (``train=False``): a missing stage.
  """
  out = {}
  for name, overrides in ablation_variants(exp.config).items():
    t = time.perf_counter()
    cfg = apply_overrides(exp.config, overrides, where=f"config.ablation.variants.{name}")
    cfg = without_ablations(cfg)
    # Table 5 ranks OURS and OURS-rand only: other systems (rand with border padding under
    # `full`) would cost feature passes no table shows.
    cfg.systems.evaluate = tuple(s for s in cfg.systems.evaluate if s in TABLE5_SYSTEMS)
    if "adaptive" in cfg.attack:
      cfg.attack.adaptive.eps = ()
    if "targeted" in cfg:
      cfg.targeted.num_targets = 0
    sub = wd.ablation_dir(workdir, name)
    fs.makedirs(sub, exist_ok=True)
    logging.info("ablation %s: %s", name, ", ".join(overrides))
    # The variant's first stage starts from the main run's recommender (its record's identity
    # is among the variant's stage inputs: jaxvars.training.records).
    ab = dataclasses.replace(exp, config=cfg, workdir=sub, timing={}, models=dataclasses.replace(
        exp.models, detector_encoder=bool(cfg.detector.train_encoder)),
        recommender_workdir=exp.recommender_workdir or workdir)
    params = with_detector_encoder(dict(exp.params, recommender=rec_params),
                                   consts["backbone"], cfg)
    history, adopted = None, []
    if train:
      main_params = dict(exp.params, recommender=rec_params)
      adopted = defense.adopt_stages(
          exp, main_params, workdir, ab, sub,
          lambda p, cfg=cfg: with_detector_encoder(p, consts["backbone"], cfg))
      try:
        params, history, seconds = defense.train_defense(ab, consts, params, sub)
      except NonFiniteLossError as e:
        out[name] = _diverged(sub, name, overrides, str(e), time.perf_counter() - t, cfg)
        continue
      ab.timing.update({f"stage_{k}_s": v for k, v in seconds.items()})
    else:
      recorded = _recorded_divergence(sub)
      if recorded is not None:
        out[name] = recorded
        continue
      params = defense.restore_stages(ab, params, sub)
    res, artifacts = evaluate_run(ab, params, consts, eval_eps=(cfg.ablation.eps,),
                                  methods=tuple(cfg.ablation.attacks), only_trained=True,
                                  cache_dir=attack_cache(exp.config, workdir))
    if artifacts:
      wd.write_artifacts(sub, artifacts)
    res["timing"]["total_s"] = time.perf_counter() - t
    row = {"overrides": list(overrides), "ranking": res["ranking"],
           "ranking_unseen": res["ranking_unseen"], "detection": res["detection"],
           "fidelity": res.get("fidelity", {}),
           "comparisons": compare_to_main(cfg, main_ranks, wd.ranks_of(artifacts)),
           "timing": res["timing"]}
    if history is not None:
      row["stages"] = history
      row["adopted_stages"] = adopted
    wd.write_results(sub, dict(row, config=cfg.to_dict()))
    out[name] = row
  return out


def _diverged(sub: str, name: str, overrides, message: str, seconds: float, cfg) -> dict:
  """The row of a variant whose training stopped at a non-finite loss (written to its
  results.json, so ``--mode=evaluate`` reports it too)."""
  logging.warning("ablation %s diverged; recorded as such, the ablation study goes on: %s",
                  name, message)
  row = {"overrides": list(overrides), "diverged": message, "timing": {"total_s": seconds}}
  wd.write_results(sub, dict(row, config=cfg.to_dict()))
  return row


def _recorded_divergence(sub: str) -> dict | None:
  path = wd.results_path(sub)
  if not fs.exists(path):
    return None
  with fs.open(path) as f:
    row = json.load(f)
  if "diverged" not in row:
    return None
  row.pop("config", None)
  return row
