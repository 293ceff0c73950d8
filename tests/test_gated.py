"""OURS-gated (``defended_gated``): D only on the photos the detector flags at the deployed
threshold, the others as uploaded (:func:`jaxvars.defenses.systems.gated_denoise`)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_models
from jaxvars import run
from jaxvars.defenses.systems import GATE_THRESHOLD, SYSTEMS, gated_denoise
from jaxvars.evaluation import checks
from jaxvars.report import writer


def _setup():
  models, params, consts, images, _, _ = tiny_models()
  x = jnp.asarray(images[:10], jnp.float32) / 255.0
  scores = np.asarray(models.detection_scores(params, consts, x))
  return models, params, consts, images, x, scores


def test_gate_denoises_exactly_the_flagged_photos():
  models, params, consts, _, x, scores = _setup()
  threshold = float(np.median(scores))
  out, flagged = gated_denoise(models, params, {**consts, GATE_THRESHOLD: threshold}, x)
  np.testing.assert_array_equal(np.asarray(flagged), scores > threshold)
  assert 0 < int(np.sum(flagged)) < len(scores)
  d = np.asarray(models.denoise(params, x))
  out, flagged = np.asarray(out), np.asarray(flagged)
  np.testing.assert_array_equal(out[~flagged], np.asarray(x)[~flagged])  # As uploaded.
  np.testing.assert_allclose(out[flagged], d[flagged], atol=1e-6)
  for t, want in ((-np.inf, d), (np.inf, np.asarray(x))):
    np.testing.assert_allclose(np.asarray(gated_denoise(
        models, params, {**consts, GATE_THRESHOLD: t}, x)[0]), want, atol=1e-6)
  # The registered transform is the same function, and needs the threshold.
  transform = SYSTEMS.get("defended_gated").make(tiny_config("/unused"))
  np.testing.assert_array_equal(
      np.asarray(transform(models, params, x, None, {**consts, GATE_THRESHOLD: threshold})), out)
  with pytest.raises(ValueError, match="detector threshold"):
    transform(models, params, x, None, consts)
  # A white-box attacker differentiates through the branch each photo takes: the identity
  # for a photo the gate passes.
  g = jax.grad(lambda v: jnp.sum(gated_denoise(models, params, {**consts, GATE_THRESHOLD: threshold},
                                               v)[0]))(x)
  np.testing.assert_allclose(np.asarray(g)[~flagged], 1.0)


def test_fidelity_of_the_gated_output():
  """'gated_unchanged' is the share of unflagged photos; 'gated_psnr' the PSNR of the mean
  squared error of the gated output over the items, computed here with numpy."""
  models, params, consts, images, x, scores = _setup()
  threshold = float(np.median(scores))
  holdout = np.arange(10)
  config = tiny_config("/unused")
  fid = checks.Fidelity(models, params, {**consts, GATE_THRESHOLD: threshold},
                        types.SimpleNamespace(images=images), holdout, config, gated=True, batch=4)
  noisy = np.clip(images.astype(np.int16) + 9, 0, 255).astype(np.uint8)
  fid.condition("shifted", noisy)
  row = fid.results["shifted"]
  xs = jnp.asarray(noisy[:10], jnp.float32) / 255.0
  flagged = np.asarray(models.detection_scores(params, consts, xs)) > threshold
  out = np.where(flagged[:, None, None, None], np.asarray(models.denoise(params, xs)),
                 np.asarray(xs))
  mse = np.mean((out - images[:10] / 255.0) ** 2)
  assert row["gated_unchanged"] == pytest.approx(1.0 - flagged.mean())
  assert row["gated_psnr"] == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-3)
  lo, hi = row["ci95"]["gated_psnr"]
  assert lo <= row["gated_psnr"] <= hi


@pytest.mark.slow
def test_gated_system_in_a_run(tfds_dir, tmp_path):
  """A run that evaluates OURS-gated: its rows under the transfer attacks and under white-box
  PGD through it (plain and detector-aware), and its fidelity columns in the report."""
  config = tiny_config(tfds_dir)
  config.systems.evaluate = ("undefended", "defended", "defended_gated")
  config.attack.eval_eps = (8,)
  config.attack.adaptive.systems = ("defended_gated",)
  config.attack.adaptive.objectives = ()
  config.attack.adaptive.sanity = False
  config.targeted.num_targets = 0
  config.stages.denoiser_mix.epochs = config.stages.joint.epochs = 0
  # A threshold that flags a quarter of the clean calibration photos: at the default 5% this
  # barely trained detector flags none of the detection items, and the gate would pass
  # every photo (the fidelity checks below then had nothing to tell apart).
  config.detector.fpr = 0.25
  results = run.train_and_evaluate(config, str(tmp_path / "run"))
  for row in ("clean", "fgsm@8", "pgd@8", "pgd-wb@8", "pgd-wb-det1@8"):
    assert f"defended_gated/{row}" in results["ranking"], row
  assert "defended_gated+gate/pgd-wb-det1@8" in results["ranking"]
  with np.load(tmp_path / "run" / "artifacts.npz") as art:
    _check_gated_fidelity(results, {k: art[k] for k in art.files if k.startswith("detector/")})
  with open(writer.write_report(str(tmp_path / "run"))) as f:
    report = f.read()
  assert "OURS-gated: share unchanged" in report and "OURS-gated" in report


def _check_gated_fidelity(results, detector_scores):
  """OURS-gated's fidelity columns against the detection tables and the raw detector scores
  of the same (detection) items at the same threshold."""
  fidelity, noise = results["fidelity"], results["detection_noise"]["clean"]
  assert set(fidelity) == {"clean", "fgsm@8", "pgd@8"}
  threshold = results["detection"]["fgsm@8"]["threshold"]
  for cond, row in fidelity.items():
    # What it passes on as uploaded is what the detector leaves unflagged: one minus the
    # flag rate of the detection tables and of the raw scores.
    flagged = detector_scores[f"detector/{cond}"] > threshold
    rate = noise["fpr"] if cond == "clean" else results["detection"][cond]["tpr_at_threshold"]
    assert row["gated_unchanged"] == pytest.approx(1.0 - rate), cond
    assert row["gated_unchanged"] == pytest.approx(1.0 - flagged.mean()), cond
    if cond == "clean":
      # A clean photo passed as uploaded has error 0: the gated output's error is that of
      # the flagged photos alone (8 of 40 here): 50.2 dB, between D's 44.7 dB on every photo
      # and the 100 dB cap of no error (margins 5.4 and 49.8 dB).
      assert 0 < flagged.sum() < len(flagged)  # The threshold both passes and flags here.
      assert row["psnr"] < row["gated_psnr"] < 100.0
    else:
      # Flagged photos get D's output, the others stay as uploaded: the gated output's PSNR
      # lies between D's and the input's (FGSM: 30.14 dB in [30.10, 30.15]; PGD: 33.91 in
      # [33.70, 33.98]; an attack's per-photo error hardly varies), to 0.01 dB.
      assert 0 < flagged.sum() < len(flagged)
      lo, hi = sorted((row["psnr"], row["psnr_input"]))
      assert lo - 0.01 <= row["gated_psnr"] <= hi + 0.01, cond
