"""Recommenders behind the registry: BPR-MF against numpy, trained end to end through the
same BPR loop as VBPR, and unmoved by image attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxvars import run
from jaxvars.recommenders import RECOMMENDERS, build_recommender


def test_registry_names():
  assert {"vbpr", "bprmf"} <= set(RECOMMENDERS.names())


def test_bprmf_scores_and_penalty_match_numpy(tfds_dir):
  rc = tiny_config(tfds_dir, **{"recommender.name": "bprmf", "recommender.reg": 0.5}).recommender
  rec = build_recommender(rc, num_users=5, num_items=7, feature_dim=3)
  params = rec.init(jax.random.key(0), 3)
  params = dict(params, item_bias=jax.random.normal(jax.random.key(1), (7,)))
  u, i, j = jnp.array([0, 4, 2]), jnp.array([1, 6, 6]), jnp.array([3, 0, 2])
  P, Q, b = (np.asarray(params[k], np.float64) for k in ("user_factors", "item_factors",
                                                       "item_bias"))
  want = [b[y] + P[x] @ Q[y] for x, y in zip(u, i)]
  np.testing.assert_allclose(rec.score(params, u, i, jnp.zeros((3, 3))), want, rtol=1e-5)
  rows = np.mean([P[x] @ P[x] + Q[y] @ Q[y] + Q[z] @ Q[z] + b[y] ** 2 + b[z] ** 2
                  for x, y, z in zip(u, i, j)])
  (term,) = rec.penalty_terms(params, u, i, j)
  assert float(term) == pytest.approx(0.5 * rows, rel=1e-5)
  assert not rec.uses_features and rec.visual_fn(params) is None


@pytest.mark.parametrize("name,form", [("vbpr", "tang"), ("vbpr", "he"), ("bprmf", "tang")])
def test_bpr_difference_equals_the_difference_of_scores(tfds_dir, name, form):
  """BPR training's ``x_ui - x_uj`` (VBPR: one projection of f_i - f_j) equals two calls of
  the score, and so do its gradients."""
  rc = tiny_config(tfds_dir, **{"recommender.name": name, "recommender.form": form}).recommender
  rec = build_recommender(rc, num_users=6, num_items=9, feature_dim=5)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                        rec.init(jax.random.key(0), 5))
  u, i, j = jnp.array([0, 5, 2, 3]), jnp.array([1, 8, 6, 0]), jnp.array([3, 0, 2, 7])
  f = jax.random.normal(jax.random.key(1), (9, 5))
  two = lambda p: rec.score(p, u, i, f[i]) - rec.score(p, u, j, f[j])
  one = lambda p: rec.difference(p, u, i, j, f[i], f[j])
  np.testing.assert_allclose(one(params), two(params), rtol=1e-5, atol=1e-6)
  g1, g2 = (jax.grad(lambda p, fn=fn: jnp.sum(jnp.tanh(fn(p))))(params) for fn in (one, two))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bprmf_trains_and_image_attacks_do_not_move_it(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, **{"recommender.name": "bprmf", "recommender.epochs": 6,
                                    "systems.evaluate": ("undefended",)})
  for stage in config.stages.values():
    stage.epochs = 0
  results = run.train_and_evaluate(config, str(tmp_path))
  r = results["ranking"]
  assert set(r) == {"mostpop/clean", "bprmf/clean", "bprmf/fgsm@8", "bprmf/pgd@8",
                    "bprmf/pgd-bpr_all@8"}
  assert results["systems"]["bprmf"]["label"] == "BPR-MF"
  # Photos play no part.
  assert r["bprmf/fgsm@8"] == r["bprmf/clean"] == r["bprmf/pgd@8"]
  # The item-subset attack (eval.max_items < the held-out items) is scored on the users whose
  # held-out item it attacked: there it equals the clean row on the same users.
  on_attacked = results["ranking_attacked"]
  assert r["bprmf/pgd-bpr_all@8"]["users"] == results["users"]["attacked"] < 60
  assert r["bprmf/pgd-bpr_all@8"] == on_attacked["bprmf/clean"] == on_attacked["bprmf/pgd-bpr_all@8"]
  assert results["targeted"] == {}
  assert results["training"]["recommender"]["history"][-1]["pairwise_accuracy"] > 0.6
