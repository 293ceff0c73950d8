"""Targeted item promotion: the target protocol, the top-N metrics against a brute-force
ranking, c-SEMA's composite, and the INSA / EXPA / TAaMR objectives."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext
from jaxvars.attacks.semantic import composite_inset
from jaxvars.evaluation import targeted


# Training interactions per item, by hand: category 'a' (items 0-3), 'b' (4-8), 'c' (9-11).
# Per item, 'b' is the least popular; in total 'c' is (5 < 6): a count-based choice fails.
COUNTS = np.array([10, 2, 1, 1,  # a: 14 interactions / 4 items = 3.5 per item
                   1, 2, 0, 3, 0,  # b: 6 / 5 = 1.2
                   0, 1, 4])  # c: 5 / 3 = 1.67


class _Data:
  def __init__(self):
    rng = np.random.default_rng(0)
    self.num_users, self.num_items = 6, 12
    self.categories = np.array(["a"] * 4 + ["b"] * 5 + ["c"] * 3)
    self.train_items = rng.permutation(np.repeat(np.arange(12), COUNTS))  # Item 0 is popular.
    self.train_users = rng.integers(0, 6, len(self.train_items))
    self.images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)


def test_targets_are_cold_items_of_the_least_popular_category():
  """Expected categories and targets worked out by hand from COUNTS (not with the functions
  under test)."""
  data = _Data()
  assert targeted.category_popularity(data) == pytest.approx({"a": 3.5, "b": 1.2, "c": 5 / 3})
  # n=2: every category has 2 items; the least popular per item is 'b' (1.2); its two
  # coldest items are 6 and 8 (no interactions).
  targets, source = targeted.choose_targets(data, 2, seed=0)
  assert source == "b" and sorted(targets.tolist()) == [6, 8] and targets.dtype == np.int32
  # n=4: 'a' and 'b' have 4 items: 'b'; its coldest four are 6, 8 (0), 4 (1), 5 (2), not 7 (3).
  targets, source = targeted.choose_targets(data, 4, seed=0)
  assert source == "b" and sorted(targets.tolist()) == [4, 5, 6, 8]
  # n=6: no category is that large: every item is a candidate, cold first: the three items
  # without interactions (6, 8, 9) and three of the four with one (2, 3, 4, 10; seeded).
  targets, source = targeted.choose_targets(data, 6, seed=0)
  assert source == "" and len(set(targets.tolist())) == 6 and {6, 8, 9} <= set(targets.tolist())
  assert set(targets.tolist()) <= {6, 8, 9, 2, 3, 4, 10}
  assert targeted.popular_category(data) == "a"  # 3.5 per item.
  # A one-item category holding the best-seller (item 0) wins without a size floor; with
  # one, the most popular category that large does; with none that large, the best-seller's.
  # z: 10 per item; a (items 1-3): 4 / 3 = 1.33; b: 1.2; c: 1.67 (in total: b, 6).
  data.categories = np.array(["z"] + ["a"] * 3 + ["b"] * 5 + ["c"] * 3)
  assert targeted.popular_category(data) == "z"
  assert targeted.popular_category(data, min_items=3) == "c"
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
  # CHR@K of every user: the source items among the top K of the items the user has not
  # bought. Where a tie straddles the cut, any order of the tied items is a valid list, so
  # the count may lie anywhere in the range those orders give (exact without a tie there).
  for u in range(5):
    for k in (2, 4):
      lo, hi = _chr_range(scores[u], mask[u], source, k)
      assert lo <= got[f"CHR@{k}"][u] <= hi, (u, k, got[f"CHR@{k}"][u], lo, hi)
  # Distinct scores: CHR@K is exact for every user.
  distinct = rng.permutation(45).reshape(5, 9) / 10.0
  got_distinct = targeted.list_metrics(distinct, mask, targets, source, ns=(1,), ks=(2, 4))
  for u in range(5):
    order = sorted((i for i in range(9) if not mask[u, i]), key=lambda i: -distinct[u, i])
    for k in (2, 4):
      assert got_distinct[f"CHR@{k}"][u] == source[order[:k]].sum(), (u, k)
  np.testing.assert_array_equal(got["scores"], scores[:, targets])


def _chr_range(scores, bought, source, k):
  """(lowest, highest) number of source items in the top ``k`` of the items not ``bought``
  over every order of tied scores."""
  items = [i for i in range(len(scores)) if not bought[i]]
  if len(items) <= k:
    n = int(source[items].sum())
    return n, n
  cut = sorted((scores[i] for i in items), reverse=True)[k - 1]
  above = [i for i in items if scores[i] > cut]
  tied = [i for i in items if scores[i] == cut]
  slots = k - len(above)
  src_tied = int(source[tied].sum())
  base = int(source[above].sum())
  return base + max(0, slots - (len(tied) - src_tied)), base + min(slots, src_tied)


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
