"""Targeted item promotion: the target protocol, the top-N metrics against a brute-force
ranking, c-SEMA's composite, and the INSA / EXPA / TAaMR objectives."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext
from jaxvars.attacks.semantic import composite_inset
from jaxvars.evaluation import targeted


class _Data:
  def __init__(self):
    rng = np.random.default_rng(0)
    self.num_users, self.num_items = 6, 12
    self.categories = np.array(["a"] * 4 + ["b"] * 5 + ["c"] * 3)
    self.train_users = rng.integers(0, 6, 30)
    self.train_items = np.r_[np.zeros(10, int), rng.integers(4, 12, 20)]  # Item 0 is popular.
    self.images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)


def test_targets_are_cold_items_of_the_least_popular_category():
  data = _Data()
  pop = targeted.category_popularity(data)
  targets, source = targeted.choose_targets(data, 3, seed=0)
  assert source == min((c for c in pop if (data.categories == c).sum() >= 3), key=pop.get)
  assert set(data.categories[targets]) == {source} and len(targets) == 3
  counts = np.bincount(data.train_items, minlength=12)
  others = np.setdiff1d(np.flatnonzero(data.categories == source), targets)
  assert counts[targets].max() <= (counts[others].min() if len(others) else np.inf)
  assert targeted.popular_category(data) == max(pop, key=pop.get)
  # A one-item category holding the best-seller (item 0) wins without a size floor; with
  # one, the most popular category that large does; with none that large, the best-seller's.
  data.categories = np.array(["z"] + ["a"] * 3 + ["b"] * 5 + ["c"] * 3)
  pop = targeted.category_popularity(data)
  assert targeted.popular_category(data) == "z"
  assert targeted.popular_category(data, min_items=3) == max(("a", "b", "c"), key=pop.get)
  assert targeted.popular_category(data, min_items=99) == "z"


@pytest.mark.parametrize("form", ["tang", "he"])
def test_all_item_scores_equal_per_pair_scores(tfds_dir, form):
  """Every user's score for every item (the targeted lists) equals the recommender's score of
  each (user, item) pair, over several blocks of users."""
  import jax
  from conftest import tiny_config
  from jaxvars.recommenders import build_recommender
  rc = tiny_config(tfds_dir, **{"recommender.form": form}).recommender
  rec = build_recommender(rc, num_users=37, num_items=50, feature_dim=6)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape),
                        rec.init(jax.random.key(0), 6))
  feats = np.asarray(jax.random.normal(jax.random.key(1), (50, 6)))
  got = targeted.all_item_scores(rec, params, feats, 37, users_per_call=16)
  u, i = np.repeat(np.arange(37), 50), np.tile(np.arange(50), 37)
  want = rec.score(params, jnp.asarray(u), jnp.asarray(i), jnp.asarray(feats[i]))
  np.testing.assert_allclose(got, np.asarray(want).reshape(37, 50), rtol=1e-5, atol=1e-6)


def test_list_metrics_match_a_brute_force_ranking():
  rng = np.random.default_rng(1)
  scores = np.round(rng.normal(size=(5, 9)), 1)  # Ties.
  mask = rng.random((5, 9)) < 0.3
  targets, source = np.array([2, 7]), np.zeros(9, bool)
  source[[1, 2, 3]] = True
  got = targeted.list_metrics(scores, mask, targets, source, ns=(1, 3), ks=(2, 4))
  for j, t in enumerate(targets):
    hits = []
    for u in range(5):
      if mask[u, t]:
        continue
      others = [i for i in range(9) if i != t and not mask[u, i]]
      rank = sum(scores[u, i] >= scores[u, t] for i in others)
      hits.append(rank)
    for n in (1, 3):
      assert got[f"HR@{n}"][j] == pytest.approx(np.mean(np.array(hits) < n))
  for u in range(5):
    order = sorted((i for i in range(9) if not mask[u, i]), key=lambda i: -scores[u, i])
    assert got["CHR@2"][u] == source[order[:2]].sum() or np.isclose(
        sorted(scores[u, ~mask[u]])[-2], sorted(scores[u, ~mask[u]])[-3])  # A tie at the cut.
  np.testing.assert_array_equal(got["scores"], scores[:, targets])


def test_csema_pastes_the_hook_on_the_right():
  images = np.zeros((2, 20, 20, 3), np.uint8)
  hook = np.full((40, 40, 3), 200, np.uint8)
  out = composite_inset(images, hook, fraction=0.5)
  assert np.all(out[:, 5:15, 10:] == 200) and np.all(out[:, :, :10] == 0)
  assert np.all(out[:, :5] == 0) and np.all(out[:, 15:] == 0)
  with pytest.raises(ValueError, match="fraction"):
    composite_inset(images, hook, fraction=0.0)


def _ctx(feats, logits=None, constants=None):
  p = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)))
  e = jnp.asarray(np.random.default_rng(3).normal(size=(5, 3)))
  score = lambda u, i, f: jnp.sum(p[u] * (f @ e), axis=-1)
  table = jnp.asarray(np.random.default_rng(4).normal(size=(6, 5)))
  return AttackContext(features=lambda _: feats, score_fn=score, visual_fn=None,
                       items=jnp.array([0, 1]), table=table, num_users=4,
                       logits=(lambda _: logits) if logits is not None else None,
                       constants=constants), p, e, table


def test_targeted_objectives_match_numpy():
  f = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5)))
  ctx, p, e, table = _ctx(f, constants={"hook_items": np.array([3, 5]), "target_class": 2},
                          logits=jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
  insa = OBJECTIVES.get("insa").loss(ctx, None)
  want = [np.mean([p[u] @ (np.asarray(f[k]) @ e) for u in range(4)]) for k in range(2)]
  np.testing.assert_allclose(insa, want, rtol=1e-5)
  np.testing.assert_allclose(OBJECTIVES.get("demote").loss(ctx, None), -np.asarray(want), rtol=1e-5)
  expa = OBJECTIVES.get("expa").loss(ctx, None)
  hook = np.asarray(table)[[3, 5]].mean(0)
  np.testing.assert_allclose(expa, -np.linalg.norm(np.asarray(f) - hook, axis=1), rtol=1e-5)
  taamr = OBJECTIVES.get("taamr").loss(ctx, None)
  np.testing.assert_allclose(taamr, [3 - np.log(np.exp([1, 2, 3]).sum()), -np.log(3)], rtol=1e-5)
  with pytest.raises(ValueError, match="classifier head"):
    OBJECTIVES.get("taamr").loss(_ctx(f, constants={"target_class": 0})[0], None)
