"""Ablation variants adopt the main run's stages they cannot change (defense.adopt_stages):
the rule (records.shaping_fields) checked against retraining, on the tiny preset."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxvars.experiment import build, make_consts, with_detector_encoder
from jaxvars.overrides import apply_overrides
from jaxvars.training import defense, records
from jaxvars.training import recommender as rec_training

# no_detector / trained_encoder style overrides: settings the denoiser-only stages never read.
UNREAD = ("loss.contrastive=0", "detector.train_encoder=True")


def _names(config):
  return defense.stage_names(config)


def test_shaping_fields_ignore_only_what_a_stage_cannot_read(tfds_dir):
  main = tiny_config(tfds_dir)
  names = _names(main)
  assert names[:2] == ["denoiser_fgsm", "denoiser_mix"] and "detector" in names
  shaping = lambda c, i: records.shaping_fields(c, names[i], names[:i + 1])
  unread = apply_overrides(main, UNREAD, where="test")
  assert shaping(unread, 0) == shaping(main, 0) and shaping(unread, 1) == shaping(main, 1)
  # The detector stage trains the (now trainable) encoder with the contrastive term.
  assert shaping(unread, names.index("detector")) != shaping(main, names.index("detector"))
  # The stage record still holds every field (a rerun with any change is caught).
  assert records.stage_fields(unread, names[0], names[:1]) != records.stage_fields(
      main, names[0], names[:1])
  for read in ("loss.perceptual=0.5", "loss.bpr=0", "loss.content=2", "denoiser.channels=8",
               "defense.train_eps=4", "stages.denoiser_fgsm.lr=0.01", "seed=3",
               "loss.content_clean=3000"):
    changed = apply_overrides(main, (read,), where="test")
    assert shaping(changed, 0) != shaping(main, 0), read


def test_unset_option_keeps_existing_records_valid(tfds_dir):
  """An option left at None (``loss.content_clean``) is not among a stage's recorded
  fields, so workdirs trained before it existed resume; set, it is recorded, and it shapes
  only stages that use the content term."""
  main = tiny_config(tfds_dir)
  names = _names(main)
  assert main.loss.content_clean is None
  assert "loss.content_clean" not in records.stage_fields(main, names[0], names[:1])
  changed = apply_overrides(main, ("loss.content_clean=3000",), where="test")
  assert records.stage_fields(changed, names[0], names[:1])["loss.content_clean"] == 3000
  # A detector stage alone (contrastive term only): the content weights shape nothing.
  assert (records.shaping_fields(changed, "detector", ["detector"])
          == records.shaping_fields(main, "detector", ["detector"]))


@pytest.mark.slow
def test_adopted_stage_equals_the_variant_trained_from_scratch(tfds_dir, tmp_path):
  """The main run trains denoiser_fgsm; a variant with UNREAD retrained from scratch ends
  with the same parameters (the rule holds), and adopting gives the variant exactly those
  parameters with its own tree (the detector's encoder copy added) without training."""
  config = tiny_config(tfds_dir)
  for stage in ("denoiser_mix", "detector", "joint"):
    config.stages[stage].epochs = 0
  main_dir = str(tmp_path / "main")
  exp = build(config, main_dir)
  consts = make_consts(exp)
  rec_state, *_ = rec_training.train_recommender(exp, consts, main_dir)
  start = dict(exp.params, recommender=rec_state.params)
  main_params, _, _ = defense.train_defense(exp, consts, start, main_dir)

  cfg = apply_overrides(config, UNREAD, where="test")

  def variant(workdir):
    return dataclasses.replace(exp, config=cfg, workdir=workdir, timing={},
                               models=dataclasses.replace(exp.models, detector_encoder=True))

  to_variant = lambda p: with_detector_encoder(p, consts["backbone"], cfg)
  scratch_dir, adopt_dir = str(tmp_path / "scratch"), str(tmp_path / "adopt")
  scratch, _, _ = defense.train_defense(variant(scratch_dir), consts, to_variant(start),
                                        scratch_dir)
  for a, b in zip(jax.tree.leaves(main_params["denoiser"]), jax.tree.leaves(scratch["denoiser"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  assert defense.adopt_stages(exp, start, main_dir, variant(adopt_dir), adopt_dir,
                              to_variant) == ["denoiser_fgsm"]
  record = records.load(os.path.join(adopt_dir, "checkpoints", "denoiser_fgsm"))
  assert record["done"] and record["seconds"] == 0.0
  assert record["adopted_from"].endswith(os.path.join("main", "checkpoints", "denoiser_fgsm"))
  assert record["history"] == records.load(
      os.path.join(main_dir, "checkpoints", "denoiser_fgsm"))["history"]
  # train_defense finds the stage finished (no step runs); restore_stages reads it.
  trained, history, seconds = defense.train_defense(variant(adopt_dir), consts,
                                                    to_variant(start), adopt_dir)
  assert seconds == {"denoiser_fgsm": 0.0} and history["denoiser_fgsm"] == record["history"]
  restored = defense.restore_stages(variant(adopt_dir), to_variant(start), adopt_dir)
  assert "encoder" in restored["detector"]
  for got in (trained, restored):
    assert jax.tree.structure(got) == jax.tree.structure(scratch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(scratch)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Adopting again is a no-op; a variant that reads a changed setting adopts nothing.
  assert defense.adopt_stages(exp, start, main_dir, variant(adopt_dir), adopt_dir,
                              to_variant) == ["denoiser_fgsm"]
  other = apply_overrides(config, ("loss.perceptual=0.5",), where="test")
  other_dir = str(tmp_path / "other")
  assert defense.adopt_stages(exp, start, main_dir, dataclasses.replace(
      exp, config=other, workdir=other_dir), other_dir, lambda p: p) == []
  assert not os.path.exists(os.path.join(other_dir, "checkpoints", "denoiser_fgsm"))
