"""Attack objectives behind the registry: the feature-space (embedding-disruption)
objective against numpy, and both objectives crafting catalogues inside their eps-balls."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_models
from jaxvars import sharding
from jaxvars.attacks.catalogue import attack_catalogue
from jaxvars.attacks.objectives import OBJECTIVES
from jaxvars.attacks.objectives.feature import feature_distance
from jaxvars.attacks.spec import AttackSpec
from jaxvars.data.pipeline import RecData


def test_registry_names():
  assert {"bpr", "feature"} <= set(OBJECTIVES.names())
  assert OBJECTIVES.get("bpr").needs_triplets and not OBJECTIVES.get("feature").needs_triplets


def test_feature_distance_matches_numpy():
  rng = np.random.default_rng(0)
  a, b, e = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
  want = np.mean(np.linalg.norm(a @ e - b @ e, axis=1))
  got = feature_distance(jnp.asarray(a), jnp.asarray(b), lambda f: f @ jnp.asarray(e))
  assert got.shape == (4,) and float(got.mean()) == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(feature_distance(jnp.asarray(a), jnp.asarray(a)), 1e-6)


def _data(images, users, items):
  n = len(images)
  return RecData(name="t", user_ids=np.arange(20).astype(str), item_ids=np.arange(n).astype(str),
                 categories=np.full(n, ""), images=images, train_users=users, train_items=items,
                 test_items=np.zeros(20, np.int32), eval_negatives=np.zeros((20, 2), np.int32),
                 has_timestamps=False)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_feature_attack_moves_the_visual_embedding_more_than_noise(method):
  models, params, consts, images, users, items = tiny_models()
  data = _data(images, users, items)
  mesh = sharding.make_mesh(1)
  spec = AttackSpec(method=method, objective="feature", eps=8.0, steps=3, alpha_ratio=0.5)
  adv, stats = attack_catalogue(spec, models=models, params=params,
                                consts=consts, data=data, mesh=mesh, batch_size=8)
  assert adv.dtype == np.uint8 and adv.shape == images.shape
  assert np.abs(adv.astype(int) - images).max() <= 8 and stats["linf_255"] <= 8.0 + 1e-4
  visual = models.recommender.visual_fn(params["recommender"])
  feats = lambda x: models.features(consts, jnp.asarray(x, jnp.float32) / 255.0)
  moved = float(feature_distance(feats(adv), consts["features"], visual).mean())
  noise = np.clip(images + np.random.default_rng(0).choice([-8, 8], images.shape), 0, 255)
  by_noise = float(feature_distance(feats(noise), consts["features"], visual).mean())
  assert moved > 1.5 * by_noise, (moved, by_noise)
  assert spec.name == f"{method}-feature" and spec.condition == f"{method}-feature@8"
