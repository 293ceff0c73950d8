"""SimCLR pretraining: NT-Xent against numpy, augmentations, linear probe, export + reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxvars import experiment, losses
from jaxvars.evaluation.probe import linear_probe
from jaxvars.training.augment import simclr_view


def test_nt_xent_matches_numpy():
  rng = np.random.default_rng(0)
  z1, z2, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 0.5
  z = np.concatenate([z1, z2])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T / t
  total = 0.0
  for i in range(8):
    j = (i + 4) % 8
    others = [k for k in range(8) if k != i]
    total += -(sim[i, j] - np.log(np.exp(sim[i, others]).sum()))
  got = losses.nt_xent(z1=jnp.asarray(z1), z2=jnp.asarray(z2), temperature=t)
  assert float(got) == pytest.approx(total / 8, rel=1e-5)


def test_simclr_views_are_valid_random_and_deterministic():
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  keys = jax.random.split(jax.random.key(1), 4)
  a, b = simclr_view(x, keys), simclr_view(x, keys)
  np.testing.assert_array_equal(a, b)
  assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  c = simclr_view(x, jax.random.split(jax.random.key(2), 4))
  assert float(jnp.abs(a - c).mean()) > 1e-3


def test_linear_probe_separates_clusters_and_drops_rare_classes():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 5
  labels = np.repeat(np.array(["a", "b", "c"]), 40)
  feats = centres[np.repeat(np.arange(3), 40)] + rng.normal(size=(120, 8))
  feats = np.concatenate([feats, rng.normal(size=(3, 8))])
  labels = np.concatenate([labels, ["rare", "rare", ""]])
  m = linear_probe(feats, labels, steps=200)
  assert m["classes"] == 3 and m["train_items"] + m["test_items"] == 120
  assert m["accuracy"] > 0.95 and m["majority_accuracy"] < 0.6


@pytest.mark.slow
def test_pretrain_exports_a_backbone_the_joint_config_loads(tfds_dir, tmp_path):
  from jaxvars import run_pretrain
  config = tiny_config(tfds_dir)
  config.task = "pretrain"
  import configs.pretrain as pretrain_cfg
  p = pretrain_cfg.get_config("tiny")
  config.pretrain = p.pretrain
  config.pretrain.epochs = 1
  results = run_pretrain.pretrain_and_evaluate(config, str(tmp_path / "pt"))
  assert set(results["backbone"]) == {"random", "self_supervised"}
  # The probe reads the garment's shape (6 categories, synthetic photos) off either backbone's
  # features far above chance (1/6) and the majority class: at this seed 0.625 (random
  # weights) and 0.600 (self-supervised, 1 epoch) on 40 held-out items; the assertion (0.4,
  # 16 of 40) holds by 0.225 and 0.2. Every labelled item is in one split (201 after the
  # 5-interaction filter, 20% held out).
  items = results["data"]["items"]
  assert items == 201
  for name, row in results["backbone"].items():
    probe = row["linear_probe"]
    assert probe["classes"] == 6, name
    assert probe["train_items"] + probe["test_items"] == items and probe["test_items"] == 40, name
    assert probe["accuracy"] >= 0.4 and probe["accuracy"] >= probe["majority_accuracy"] + 0.2, (
        name, probe)
  assert results["timing"]["pretrain_images_per_s"] > 0
  joint = tiny_config(tfds_dir, **{"backbone.init": f"self_supervised:{tmp_path / 'pt'}"})
  exp = experiment.build(joint, None)
  random_exp = experiment.build(tiny_config(tfds_dir), None)
  leaves = jax.tree.leaves(exp.backbone_vars)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves,
                                                      jax.tree.leaves(random_exp.backbone_vars)))
