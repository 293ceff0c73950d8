"""The defence's checks beside the ranking: detection of attacked photos (paper 4.2, Table 4,
Figures 8-11) and the denoiser's image fidelity, measured on items the defence never
trained on, one condition at a time."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars import rng
from jaxvars.conditions import CLEAN
from jaxvars.evaluation import bootstrap
from jaxvars.evaluation.detection import detection_metrics, roc_auc
from jaxvars.defenses.systems import gated_denoise
from jaxvars.evaluation.fidelity import psnr, psnr_of_mse, ssim
from jaxvars.features import batched_map
from jaxvars.pixels import to_float, to_uint8


class Scored:
  """One detector's threshold and metrics from its scores, the same for the paper's detector
  and every detection baseline (:mod:`jaxvars.defenses.baselines`), so their numbers differ
  only by their scores.

  The threshold is the (1 - ``config.detector.fpr``) quantile of the clean calibration
  photos' scores (:func:`jaxvars.evaluation.detection.detection_metrics`); a score above it
  means "attacked".

  Args:
    calibration: float [C] scores of the clean calibration photos.
    clean: float [H] scores of the clean detection (held-out) photos.
    config: the run's config (``detector.fpr``, ``eval.bootstrap_resamples``, ``eval.bootstrap_seed``).
  """

  def __init__(self, calibration: np.ndarray, clean: np.ndarray, config):
    self.calibration, self.clean = np.asarray(calibration), np.asarray(clean)
    self.fpr = float(config.detector.fpr)
    self.threshold = float(np.quantile(self.calibration, 1.0 - self.fpr))
    e = config.eval
    self.kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))

  def attacked(self, adv: np.ndarray) -> dict:
    """The row of an attack from the held-out photos' attacked scores ``adv`` [H]:
    :func:`~jaxvars.evaluation.detection.detection_metrics` plus ``ci95`` (accuracy and ROC
    AUC, 95% bootstrap over items, clean and attacked resampled independently) and ``items``."""
    row = detection_metrics(calibration_clean=self.calibration, clean=self.clean,
                            adversarial=adv, fpr=self.fpr)
    thr = row["threshold"]
    accuracy = lambda c, a: 0.5 * (np.mean(a > thr) + 1.0 - np.mean(c > thr))
    row["ci95"] = {"accuracy": bootstrap.statistic_ci(accuracy, self.clean, adv, **self.kw),
                   "roc_auc": bootstrap.statistic_ci(roc_auc, self.clean, adv, **self.kw)}
    row["items"] = int(len(adv))
    return row

  def false_alarms(self, scores: np.ndarray) -> dict:
    """{'fpr', 'ci95': {'fpr'}, 'items'}: the share of photos with ``scores`` [N] (clean or
    benign-noise photos) flagged at the threshold, with its 95% bootstrap interval."""
    flagged = np.asarray(scores) > self.threshold
    return {"fpr": float(np.mean(flagged)), "ci95": {"fpr": bootstrap.mean_ci(flagged, **self.kw)},
            "items": int(len(flagged))}


class Detection:
  """Detector scores of the detection items (clean, and under each attack), the threshold
  from the clean calibration items, metrics with 95% intervals over items, and the
  false-alarm rate on clean photos with benign Gaussian noise (the paper's claim); the same
  for each detection baseline of ``config.detector.baselines`` (:mod:`jaxvars.defenses.
  baselines`: feature squeezing), on the same photos, through the same :class:`Scored`.

  ``results``: {condition: detection_metrics + {'items', 'ci95': {'accuracy', 'roc_auc'}}};
  :meth:`baseline_results`: {baseline: {'label', 'settings', 'threshold', 'detection': {condition:
  the same row}, 'noise': as :meth:`noise`}}. Raw scores and figure inputs go to ``artifacts``.
  """

  def __init__(self, models, params, consts, data, mesh, config, holdout, calibration,
               timing: dict, artifacts: dict, *, baselines: bool = True):
    t = time.perf_counter()
    self.models, self.params, self.consts, self.data = models, params, consts, data
    self.mesh, self.config, self.holdout, self.timing = mesh, config, holdout, timing
    self.artifacts = artifacts
    # Weights as arguments: one compilation for every condition this run scores.
    self._scores_fn = jax.jit(lambda p, c, b: models.detection_scores(p, c, to_float(b["images"])))
    self.ours = Scored(self.scores(data.images[calibration]), self.scores(data.images[holdout]),
                       config)
    self.calibration, self.clean, self.threshold = (self.ours.calibration, self.ours.clean,
                                                    self.ours.threshold)
    self.results = {}
    artifacts.update({"detector/calibration_clean": self.calibration,
                      "detector/clean": self.clean,
                      "holdout_items": np.asarray(holdout, np.int32)})
    timing["detection_s"] = time.perf_counter() - t
    self.baselines, self._baseline_fns, self._baseline_results = {}, {}, {}
    if baselines:
      self._init_baselines(calibration)

  def _init_baselines(self, calibration) -> None:
    from jaxvars.defenses.baselines import DETECTION_BASELINES
    t = time.perf_counter()
    for name in self.config.detector.get("baselines", ()):
      entry = DETECTION_BASELINES.get(name, "config.detector.baselines")
      if entry.needs_visual and not self.models.recommender.uses_features:
        logging.info("detection baseline %s skipped: recommender %r uses no item photos", name,
                     self.models.recommender.name)
        continue
      fn = entry.make(self.config)
      self._baseline_fns[name] = (jax.jit(
          lambda p, c, b, fn=fn: fn(self.models, p, c, to_float(b["images"]))),
          entry.host_callback)
      scored = Scored(self.baseline_scores(name, self.data.images[calibration]),
                      self.baseline_scores(name, self.data.images[self.holdout]), self.config)
      self.baselines[name] = scored
      self._baseline_results[name] = {"label": entry.label, "description": entry.description,
                                      "settings": entry.settings(self.config),
                                      "threshold": scored.threshold, "detection": {}}
      self.artifacts.update({f"{name}/calibration_clean": scored.calibration,
                             f"{name}/clean": scored.clean})
    self.timing["detection_baselines_s"] = time.perf_counter() - t

  def scores(self, images: np.ndarray) -> np.ndarray:
    """Detector scores ||z(x) - z(D(x))|| [N] of uint8 images [N, S, S, 3]."""
    fn = lambda b: self._scores_fn(self.params, self.consts, b)
    return batched_map(fn, {"images": images}, batch_size=self.config.attack.batch_size,
                       mesh=self.mesh, desc="detector scores")

  def baseline_scores(self, name: str, images: np.ndarray) -> np.ndarray:
    """Scores [N] of detection baseline ``name`` of uint8 images [N, S, S, 3] (one batch at a
    time where it runs host code)."""
    jitted, host = self._baseline_fns[name]
    fn = lambda b: jitted(self.params, self.consts, b)
    return batched_map(fn, {"images": images}, batch_size=self.config.attack.batch_size,
                       mesh=self.mesh, desc=f"{name} scores", workers=1 if host else None)

  def condition(self, cond: str, images: np.ndarray, *, attacked: bool, artifacts: dict):
    t = time.perf_counter()
    if attacked:
      adv = self.scores(images[self.holdout])
      artifacts[f"detector/{cond}"] = adv
      self.results[cond] = self.ours.attacked(adv)
    artifacts.update(report_samples(models=self.models, params=self.params, consts=self.consts,
                                    conditions={cond: images}, holdout=self.holdout))
    self.timing["detection_s"] += time.perf_counter() - t
    if attacked and self.baselines:
      t = time.perf_counter()
      for name, scored in self.baselines.items():
        adv = self.baseline_scores(name, images[self.holdout])
        artifacts[f"{name}/{cond}"] = adv
        self._baseline_results[name]["detection"][cond] = scored.attacked(adv)
      self.timing["detection_baselines_s"] += time.perf_counter() - t

  def _noisy(self):
    """(name, uint8 photos) of the detection items' clean photos plus N(0, sigma) noise for
    each sigma of ``config.detector.noise_sigmas`` (1/255 units), 8-bit quantised: the same
    photos for every detector."""
    clean = self.data.images[self.holdout]
    for sigma in self.config.detector.noise_sigmas:
      key = jax.random.fold_in(rng.stream(self.config.seed, rng.NOISE_CHECK), int(sigma * 1000))
      noise = np.asarray(jax.random.normal(key, clean.shape)) * float(sigma)
      yield (f"sigma={float(sigma):g}",
             np.clip(np.round(clean.astype(np.float32) + noise), 0, 255).astype(np.uint8))

  def noise(self) -> dict:
    """False-positive rate at the deployed threshold on the detection items' clean photos
    plus N(0, sigma) noise, sigma in ``config.detector.noise_sigmas`` (1/255 units), 8-bit
    quantised: {'sigma=<s>': {'fpr', 'ci95': {'fpr'}, 'items'}}, and the clean photos'. The
    detection baselines' rates on the same photos go to :meth:`baseline_results`."""
    out = {"clean": self.ours.false_alarms(self.clean)}
    for name, scored in self.baselines.items():
      self._baseline_results[name]["noise"] = {"clean": scored.false_alarms(scored.clean)}
    for key, noisy in self._noisy():
      out[key] = self.ours.false_alarms(self.scores(noisy))
      t = time.perf_counter()
      for name, scored in self.baselines.items():
        self._baseline_results[name]["noise"][key] = scored.false_alarms(
            self.baseline_scores(name, noisy))
      if self.baselines:
        self.timing["detection_baselines_s"] += time.perf_counter() - t
    return out

  def baseline_results(self) -> dict:
    """results.json's ``detection_baselines`` (call after :meth:`noise`): {baseline: {'label',
    'description', 'settings', 'threshold', 'detection': {condition: row as in ``results``},
    'noise': {'clean' | 'sigma=<s>': {'fpr', 'ci95', 'items'}}}}."""
    return self._baseline_results


class Fidelity:
  """How close the denoiser's output is to the clean photo, per condition, on the
  detection items: PSNR (dB) and SSIM of D(x) against the clean photo, the PSNR of the
  input itself (what the attack did), and the L2 distance of D(x)'s normalised backbone
  features from the clean photo's. ``results``: {condition: {metric: mean, 'ci95':
  {metric: [lo, hi]}, 'items'}}.

  With ``gated`` (consts hold the deployed threshold; the gated system,
  :func:`jaxvars.defenses.systems.gated_denoise`) also what OURS-gated passes on:
  'gated_unchanged', the share of photos it leaves as uploaded (not flagged), and
  'gated_psnr', the PSNR (dB) of its output against the clean photo from the mean squared
  error over the items (a photo left unchanged has error 0, so a per-photo mean of PSNRs
  would be infinite).
  """

  METRICS = ("psnr", "ssim", "psnr_input", "feature_l2")

  def __init__(self, models, params, consts, data, holdout, config, *, batch: int = 64,
               gated: bool = False):
    self.holdout, self.clean, self.batch, self.gated = holdout, data.images[holdout], batch, gated
    e = config.eval
    self.kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
    self.results = {}

    @jax.jit
    def measure(x_u8, clean_u8):
      x, clean = to_float(x_u8), to_float(clean_u8)
      d = models.denoise(params, x)
      f_d, f_c = models.features(consts, d), models.features(consts, clean)
      cols = [psnr(d, clean), ssim(d, clean), psnr(x, clean),
              jnp.linalg.norm(f_d - f_c, axis=-1)]
      if gated:
        g, flagged = gated_denoise(models, params, consts, x)
        cols += [1.0 - flagged.astype(jnp.float32),
                 jnp.mean(jnp.square(g - clean), axis=(1, 2, 3))]
      return jnp.stack(cols, axis=-1)

    self._measure = measure

  def condition(self, cond: str, images: np.ndarray) -> None:
    seen = images[self.holdout]
    m = np.concatenate([np.asarray(self._measure(a, b))
                        for a, b in _chunks(seen, self.clean, self.batch)])
    out = {n: float(m[:, k].mean()) for k, n in enumerate(self.METRICS)}
    out["ci95"] = {n: bootstrap.mean_ci(m[:, k], **self.kw) for k, n in enumerate(self.METRICS)}
    if self.gated:
      k = len(self.METRICS)
      pooled_psnr = lambda mse: float(psnr_of_mse(np.mean(mse)))
      out["gated_unchanged"] = float(m[:, k].mean())
      out["gated_psnr"] = pooled_psnr(m[:, k + 1])
      out["ci95"]["gated_unchanged"] = bootstrap.mean_ci(m[:, k], **self.kw)
      out["ci95"]["gated_psnr"] = bootstrap.statistic_ci(pooled_psnr, m[:, k + 1], **self.kw)
    out["items"] = int(len(m))
    self.results[cond] = out


def _chunks(a: np.ndarray, b: np.ndarray, size: int):
  for start in range(0, len(a), size):
    yield a[start:start + size], b[start:start + size]


def report_samples(*, models, params, consts, conditions, holdout, images_per_condition=8,
                   embedded_items=200) -> dict[str, np.ndarray]:
  """Pictures and embeddings for figures: for the first held-out items, each condition's
  uint8 images and their denoised versions; detector embeddings of clean, denoised and
  attacked images of up to ``embedded_items`` held-out items."""
  out = {}
  denoise = jax.jit(lambda x: to_uint8(models.denoise(params, to_float(x))))
  embed = jax.jit(lambda x: models.embed(params, consts, to_float(x)))
  shown, embedded = holdout[:images_per_condition], holdout[:embedded_items]
  for cond, images in conditions.items():
    out[f"images/{cond}"] = images[shown]
    out[f"images/{cond}/denoised"] = np.asarray(denoise(images[shown]))
    out[f"embeddings/{cond}"] = np.asarray(embed(images[embedded]))
    if cond == CLEAN:
      out["embeddings/clean/denoised"] = np.asarray(embed(np.asarray(denoise(images[embedded]))))
  return out
