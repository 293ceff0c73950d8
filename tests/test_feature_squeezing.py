"""Feature squeezing (Xu et al. 2018) as a detection baseline (jaxvars/defenses/feature_squeezing.py):
its score is 0 where the squeezers change nothing, equals a numpy/PIL reference computed another
way, and goes through the same threshold, metric and interval code as the paper's detector
(jaxvars/evaluation/checks.py), which gives the same numbers when fed the same scores; the
report's Table 4 layout with a row per detector."""

import dataclasses
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, tiny_models
from jaxvars import configuration, sharding
from jaxvars.defenses.baselines import DETECTION_BASELINES
from jaxvars.defenses.feature_squeezing import squeeze, squeezing_scores
from jaxvars.errors import ConfigError
from jaxvars.evaluation import checks
from jaxvars.report import checks_tables


def _score_fn(config):
  fn = DETECTION_BASELINES.get("feature_squeezing").make(config)
  return jax.jit(lambda m, p, c, x: fn(m, p, c, x), static_argnums=0)


def _blocks(n, size=16, seed=0):
  """Photos [n, size, size, 3] uint8 of black or white 8 x 8 blocks (aligned with JPEG's
  blocks), each block grey-level 0 or 255: on every bit-depth grid, and a JPEG round trip at
  any quality reproduces them exactly (constant blocks, no chroma)."""
  rng = np.random.default_rng(seed)
  tiles = rng.integers(0, 2, (n, size // 8, size // 8)) * 255
  return np.repeat(np.repeat(tiles, 8, 1), 8, 2)[..., None].repeat(3, -1).astype(np.uint8)


def test_score_is_zero_where_the_squeezers_change_nothing(tfds_dir):
  models, params, consts, _, _, _ = tiny_models()
  config = tiny_config(tfds_dir)
  x = jnp.asarray(_blocks(6) / 255.0, jnp.float32)
  squeezed = np.asarray(squeeze(x, jpeg_quality=75, bits=5))
  assert np.array_equal(squeezed[0], np.asarray(x)) and np.array_equal(squeezed[1], np.asarray(x))
  scores = np.asarray(_score_fn(config)(models, params, consts, x))
  assert scores.shape == (6,) and scores.dtype == np.float32
  np.testing.assert_array_equal(scores, 0.0)
  # Random photos do move under the squeezers: the score is positive there.
  rand = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  assert np.all(np.asarray(_score_fn(config)(models, params, consts, rand)) > 0)


def _pil_jpeg(u8, quality):
  buffer = io.BytesIO()
  Image.fromarray(u8).save(buffer, "JPEG", quality=quality)
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


@pytest.mark.parametrize("quality,bits", [(75, 5), (30, 3)])
def test_score_equals_a_numpy_reference(quality, bits, tfds_dir):
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir, **{"detector.squeeze_jpeg_quality": quality,
                                    "detector.squeeze_bit_depth": bits})
  u8 = images[:8]
  got = np.asarray(_score_fn(config)(models, params, consts, jnp.asarray(u8 / 255.0, jnp.float32)))
  # The reference: PIL's codec and numpy rounding for the squeezers, each set of photos through
  # the backbone on its own, E f as a numpy product with VBPR's projection, numpy's L1 and max.
  x = u8 / 255.0
  jpeg = np.stack([_pil_jpeg(img, quality) for img in u8]) / 255.0
  levels = 2 ** bits - 1
  depth = np.round(x * levels) / levels
  proj = np.asarray(params["recommender"]["visual_projection"], np.float64)
  embed = lambda imgs: np.asarray(models.features(consts, jnp.asarray(imgs, jnp.float32)),
                                  np.float64) @ proj
  e = embed(x)
  want = np.maximum(np.abs(embed(jpeg) - e).sum(-1), np.abs(embed(depth) - e).sum(-1))
  assert np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(e).sum(-1).max())
  # squeezing_scores is the max of the two L1 distances for any embedding.
  lin = jnp.asarray(np.random.default_rng(1).normal(size=(16 * 16 * 3, 5)), jnp.float32)
  emb = lambda z: z.reshape(z.shape[0], -1) @ lin
  got2 = np.asarray(squeezing_scores(emb, jnp.asarray(x, jnp.float32), jpeg_quality=quality,
                                     bits=bits))
  flat = lambda a: a.reshape(len(a), -1) @ np.asarray(lin, np.float64)
  want2 = np.maximum(np.abs(flat(jpeg) - flat(x)).sum(-1), np.abs(flat(depth) - flat(x)).sum(-1))
  np.testing.assert_allclose(got2, want2, rtol=1e-4, atol=1e-4)


def _detection(models, params, consts, images, config, artifacts):
  data = types.SimpleNamespace(images=images)
  mesh = sharding.make_mesh(1)
  holdout, calibration = np.arange(0, 16), np.arange(16, 40)
  return checks.Detection(models, params, consts, data, mesh, config, holdout, calibration, {},
                          artifacts)


def test_baseline_fed_our_scores_gives_our_numbers(tfds_dir, monkeypatch):
  """The baseline's threshold, metrics, intervals and false-alarm rates come from the same code
  as the detector's: given the detector's own scores, every number is the same."""
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir)
  config.attack.batch_size = 8
  config.detector.noise_sigmas = (4.0, 8.0)
  entry = DETECTION_BASELINES.get("feature_squeezing")
  ours = lambda config: (lambda m, p, c, x: m.detection_scores(p, c, x))
  monkeypatch.setitem(DETECTION_BASELINES._entries, "feature_squeezing",
                      dataclasses.replace(entry, make=ours))
  artifacts = {}
  det = _detection(models, params, consts, images, config, artifacts)
  adv = np.clip(images.astype(int) + np.where(np.arange(3) % 2, 8, -8), 0, 255).astype(np.uint8)
  det.condition("pgd@8", adv, attacked=True, artifacts=artifacts)
  noise = det.noise()
  base = det.baseline_results()["feature_squeezing"]
  assert base["threshold"] == det.threshold
  assert base["detection"]["pgd@8"] == det.results["pgd@8"]
  assert base["noise"] == noise and set(noise) == {"clean", "sigma=4", "sigma=8"}
  np.testing.assert_array_equal(artifacts["feature_squeezing/pgd@8"], artifacts["detector/pgd@8"])
  row = det.results["pgd@8"]
  assert set(row) >= {"accuracy", "roc_auc", "threshold", "fpr_at_threshold", "tpr_at_threshold",
                      "ci95", "items"} and row["items"] == 16
  assert row["ci95"]["accuracy"][0] <= row["accuracy"] <= row["ci95"]["accuracy"][1]


def test_feature_squeezing_in_detection(tfds_dir):
  """The real baseline: its threshold is the calibration scores' (1 - fpr) quantile, its rows have
  the detector's keys, and its settings are recorded; off when config.detector.baselines is ()."""
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir)
  config.attack.batch_size = 8
  artifacts = {}
  det = _detection(models, params, consts, images, config, artifacts)
  scored = det.baselines["feature_squeezing"]
  cal = artifacts["feature_squeezing/calibration_clean"]
  assert cal.shape == (24,) and np.all(cal > 0)
  assert scored.threshold == float(np.quantile(cal, 1 - config.detector.fpr))
  adv = np.asarray(jax.random.randint(jax.random.key(5), images.shape, 0, 256), np.uint8)
  det.condition("pgd@8", adv, attacked=True, artifacts=artifacts)
  det.noise()
  base = det.baseline_results()["feature_squeezing"]
  assert set(base["detection"]["pgd@8"]) == set(det.results["pgd@8"])
  assert base["settings"]["jpeg_quality"] == 75 and base["settings"]["bit_depth"] == 5
  assert base["label"] == "Feature squeezing" and set(base["noise"]) == {"clean", "sigma=4"}
  config.detector.baselines = ()
  off = _detection(models, params, consts, images, config, {})
  assert off.baselines == {} and off.baseline_results() == {}


@pytest.mark.parametrize("field,value,message", [
    ("detector.squeeze_jpeg_quality", 0, r"config.detector.squeeze_jpeg_quality=0 must be an "
                                         r"integer in \[1, 95\]"),
    ("detector.squeeze_bit_depth", 9, r"config.detector.squeeze_bit_depth=9 must be an integer"),
    ("detector.baselines", ("nope",), r"config.detector.baselines='nope' is not a known"),
    ("detector.baselines", ("feature_squeezing",) * 2, r"distinct names")])
def test_settings_are_validated(field, value, message, tfds_dir):
  with pytest.raises(ConfigError, match=message):
    configuration.validate(tiny_config(tfds_dir, **{field: value}))


def test_report_table4_layout_has_a_row_per_detector():
  row = lambda acc: {"accuracy": acc, "roc_auc": 0.9, "ci95": {"accuracy": [acc - 0.1, acc],
                                                               "roc_auc": [0.8, 1.0]}}
  results = {
      "ranking": {"vbpr/clean": {}, "vbpr/pgd@8": {}, "vbpr/pgd@16": {}},
      "rows": {"vbpr/clean": {"system": "vbpr", "condition": "clean"},
               "vbpr/pgd@8": {"system": "vbpr", "condition": "pgd@8"},
               "vbpr/pgd@16": {"system": "vbpr", "condition": "pgd@16"}},
      "detection": {"pgd@8": row(0.9), "pgd@16": row(0.95)},
      "detection_noise": {"clean": {"fpr": 0.05}, "sigma=4": {"fpr": 0.1}},
      "detection_baselines": {"feature_squeezing": {
          "label": "Feature squeezing", "detection": {"pgd@8": row(0.6), "pgd@16": row(0.7)},
          "noise": {"clean": {"fpr": 0.04}, "sigma=4": {"fpr": 0.5}}}}}
  lines = checks_tables.baselines_table(results)
  assert lines[0] == "| detector | attack | metric | eps=8 | eps=16 |"
  assert lines[2].startswith("| OURS (contrastive detector) | PGD | accuracy (deployed threshold) "
                             "| 0.9000 [0.8000, 0.9000] | 0.9500")
  assert lines[3].startswith("| Feature squeezing | PGD | accuracy (deployed threshold) | 0.6000")
  assert len(lines) == 6  # Two detectors x (accuracy, ROC AUC).
  noise = checks_tables.baselines_noise_table(results)
  assert noise[0] == "| input | OURS (contrastive detector): flagged | Feature squeezing: flagged |"
  assert noise[3] == "| clean + N(0, 4/255) | 0.1000 | 0.5000 |"
  assert checks_tables.baselines_table(dict(results, detection_baselines={})) == []
