"""The defence's checks beside the ranking: detection of attacked photos (paper 4.2, Table 4,
Figures 8-11) and the denoiser's image fidelity, measured on items the defence never
trained on, one condition at a time."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars import rng
from jaxvars.conditions import CLEAN
from jaxvars.evaluation import bootstrap
from jaxvars.evaluation.detection import detection_metrics, roc_auc
from jaxvars.defenses.systems import gated_denoise
from jaxvars.evaluation.fidelity import psnr, psnr_of_mse, ssim
from jaxvars.features import batched_map
from jaxvars.pixels import to_float, to_uint8


class Detection:
  """Detector scores of the detection items (clean, and under each attack), the threshold
  from the clean calibration items, metrics with 95% intervals over items, and the
  false-alarm rate on clean photos with benign Gaussian noise (the paper's claim).

  ``results``: {condition: detection_metrics + {'items', 'ci95': {'accuracy', 'roc_auc'}}}.
  Raw scores and figure inputs go to ``artifacts``.
  """

  def __init__(self, models, params, consts, data, mesh, config, holdout, calibration,
               timing: dict, artifacts: dict):
    t = time.perf_counter()
    self.models, self.params, self.consts, self.data = models, params, consts, data
    self.mesh, self.config, self.holdout, self.timing = mesh, config, holdout, timing
    self.artifacts = artifacts
    # Weights as arguments: one compilation for every condition this run scores.
    self._scores_fn = jax.jit(lambda p, c, b: models.detection_scores(p, c, to_float(b["images"])))
    self.calibration = self.scores(data.images[calibration])
    self.clean = self.scores(data.images[holdout])
    self.threshold = float(np.quantile(self.calibration, 1.0 - config.detector.fpr))
    self.results = {}
    artifacts.update({"detector/calibration_clean": self.calibration,
                      "detector/clean": self.clean,
                      "holdout_items": np.asarray(holdout, np.int32)})
    timing["detection_s"] = time.perf_counter() - t

  def scores(self, images: np.ndarray) -> np.ndarray:
    """Detector scores ||z(x) - z(D(x))|| [N] of uint8 images [N, S, S, 3]."""
    fn = lambda b: self._scores_fn(self.params, self.consts, b)
    return batched_map(fn, {"images": images}, batch_size=self.config.attack.batch_size,
                       mesh=self.mesh, desc="detector scores")

  def condition(self, cond: str, images: np.ndarray, *, attacked: bool, artifacts: dict):
    t = time.perf_counter()
    if attacked:
      adv = self.scores(images[self.holdout])
      artifacts[f"detector/{cond}"] = adv
      row = detection_metrics(calibration_clean=self.calibration, clean=self.clean,
                              adversarial=adv, fpr=self.config.detector.fpr)
      e = self.config.eval
      kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
      thr = row["threshold"]
      accuracy = lambda c, a: 0.5 * (np.mean(a > thr) + 1.0 - np.mean(c > thr))
      row["ci95"] = {"accuracy": bootstrap.statistic_ci(accuracy, self.clean, adv, **kw),
                     "roc_auc": bootstrap.statistic_ci(roc_auc, self.clean, adv, **kw)}
      row["items"] = int(len(self.holdout))
      self.results[cond] = row
    artifacts.update(report_samples(models=self.models, params=self.params, consts=self.consts,
                                    conditions={cond: images}, holdout=self.holdout))
    self.timing["detection_s"] += time.perf_counter() - t

  def noise(self) -> dict:
    """False-positive rate at the deployed threshold on the detection items' clean photos
    plus N(0, sigma) noise, sigma in ``config.detector.noise_sigmas`` (1/255 units), 8-bit
    quantised: {'sigma=<s>': {'fpr', 'ci95': {'fpr'}, 'items'}}, and the clean photos'."""
    e = self.config.eval
    kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
    out = {"clean": {"fpr": float(np.mean(self.clean > self.threshold)),
                     "ci95": {"fpr": bootstrap.mean_ci(self.clean > self.threshold, **kw)},
                     "items": int(len(self.clean))}}
    clean = self.data.images[self.holdout]
    for sigma in self.config.detector.noise_sigmas:
      key = jax.random.fold_in(rng.stream(self.config.seed, rng.NOISE_CHECK), int(sigma * 1000))
      noise = np.asarray(jax.random.normal(key, clean.shape)) * float(sigma)
      noisy = np.clip(np.round(clean.astype(np.float32) + noise), 0, 255).astype(np.uint8)
      flagged = self.scores(noisy) > self.threshold
      out[f"sigma={float(sigma):g}"] = {"fpr": float(np.mean(flagged)),
                                        "ci95": {"fpr": bootstrap.mean_ci(flagged, **kw)},
                                        "items": int(len(flagged))}
    return out


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
