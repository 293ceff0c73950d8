"""The full-ranking protocol against a plain numpy loop, and the rank-metric registry: each
metric against a hand computation, hits() unchanged, a metric file registers itself."""

import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvars.evaluation import rank_metrics, ranking, summary
from jaxvars.evaluation.full_ranking import full_ranks
from jaxvars.evaluation.rank_metrics import FULL_METRICS, RANK_METRICS, per_user
from jaxvars.registry import import_submodules


@dataclasses.dataclass(frozen=True, eq=False)
class _TableRecommender:
  """A fake recommender (hashable by identity) whose score is a fixed table [U, I] plus the
  item's first feature: users [B, 1], items [1, I], features [1, I, F] -> scores [B, I]."""
  table: np.ndarray

  def score(self, params, users, items, features):
    return jnp.asarray(self.table)[users, items] + features[..., 0] * params["feature_weight"]


def _reference(scores, test_items, train_users, train_items):
  """Per user: items not bought and not the positive scoring >= the positive (numpy loop)."""
  out = []
  for u, pos in enumerate(test_items):
    bought = set(train_items[train_users == u].tolist())
    competitors = [i for i in range(scores.shape[1]) if i not in bought and i != pos]
    out.append(int(np.sum(scores[u, competitors] >= scores[u, pos])))
  return np.array(out, np.int64)


def _case(seed=0, num_users=11, num_items=23):
  rng = np.random.default_rng(seed)
  table = rng.integers(0, 4, (num_users, num_items)).astype(np.float32)  # Many ties.
  test_items = rng.integers(0, num_items, num_users)
  train_users = rng.integers(0, num_users, 60)
  train_items = rng.integers(0, num_items, 60)
  # User 0 bought every item scoring above its held-out item: the full rank is 0 only when
  # they are masked out (and the ties are still counted).
  table[0] = 1.0
  table[0, :6] = 3.0
  table[0, 7] = 2.0
  test_items[0] = 7
  keep = train_users != 0
  train_users = np.r_[np.zeros(6, int), train_users[keep]]
  train_items = np.r_[np.arange(6), train_items[keep]]
  return table, test_items, train_users, train_items


@pytest.mark.parametrize("batch_users", [1, 4, 11, 16])  # 4 does not divide 11 users.
def test_full_ranks_equal_a_numpy_loop_with_ties(batch_users):
  table, test_items, train_users, train_items = _case()
  rec = _TableRecommender(table)
  params = {"feature_weight": jnp.float32(0.0)}
  feats = np.zeros((table.shape[1], 3), np.float32)
  got = full_ranks(rec, params, feats, test_items=test_items, train_users=train_users,
                   train_items=train_items, batch_users=batch_users)
  want = _reference(table, test_items, train_users, train_items)
  assert got.dtype == np.int64 and got.shape == (11,)
  np.testing.assert_array_equal(got, want)
  assert got[0] == 0  # High scorers bought in training are not competitors.
  # Without the mask user 0's high scorers (and its tie) would count: the mask matters.
  unmasked = _reference(table, test_items, np.zeros(0, int), np.zeros(0, int))
  assert unmasked[0] == 6 and np.any(unmasked != want)
  # Ties count against the positive: a strict comparison would rank lower in this case.
  strict = [np.sum(np.delete(table[u], [test_items[u]]) > table[u, test_items[u]])
            for u in range(11)]
  assert np.any(_reference(table, test_items, np.zeros(0, int), np.zeros(0, int)) > strict)


def test_full_ranks_of_k_draws_rank_each_draw():
  table, test_items, train_users, train_items = _case(seed=1)
  rng = np.random.default_rng(5)
  draws = rng.integers(0, 3, (3, table.shape[1], 2)).astype(np.float32)  # [K, I, F]
  rec = _TableRecommender(table)
  params = {"feature_weight": jnp.float32(1.0)}
  got = full_ranks(rec, params, draws, test_items=test_items, train_users=train_users,
                   train_items=train_items, batch_users=4)
  assert got.shape == (3, 11) and got.dtype == np.int64
  for k in range(3):
    want = _reference(table + draws[k, :, 0][None], test_items, train_users, train_items)
    np.testing.assert_array_equal(got[k], want)
    single = full_ranks(rec, params, draws[k], test_items=test_items, train_users=train_users,
                        train_items=train_items, batch_users=4)
    np.testing.assert_array_equal(single, want)
  assert not np.array_equal(got[0], got[1])  # The draws' features do move the ranks.


def test_full_ranks_of_a_real_recommender(tfds_dir):
  """VBPR's broadcast scores [B, I] rank as its full score matrix does."""
  import jax
  from conftest import tiny_config
  from jaxvars.evaluation.targeted import all_item_scores
  from jaxvars.recommenders import build_recommender
  rec = build_recommender(tiny_config(tfds_dir).recommender, num_users=13, num_items=30,
                          feature_dim=5)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape),
                        rec.init(jax.random.key(0), 5))
  feats = np.asarray(jax.random.normal(jax.random.key(1), (30, 5)))
  rng = np.random.default_rng(2)
  test_items = rng.integers(0, 30, 13)
  train_users, train_items = rng.integers(0, 13, 80), rng.integers(0, 30, 80)
  got = full_ranks(rec, params, feats, test_items=test_items, train_users=train_users,
                   train_items=train_items, batch_users=5)
  scores = all_item_scores(rec, params, feats, 13, users_per_call=5)
  np.testing.assert_array_equal(got, _reference(scores, test_items, train_users, train_items))


def test_full_ranks_reject_bad_inputs():
  rec = _TableRecommender(np.zeros((2, 4), np.float32))
  kw = dict(train_users=np.array([0]), train_items=np.array([1]))
  with pytest.raises(ValueError, match="features"):
    full_ranks(rec, {}, np.zeros(4), test_items=np.array([0, 1]), **kw)
  with pytest.raises(ValueError, match="test_items"):
    full_ranks(rec, {}, np.zeros((4, 1)), test_items=np.array([0, 4]), **kw)
  with pytest.raises(ValueError, match="equal-length"):
    full_ranks(rec, {}, np.zeros((4, 1)), test_items=np.array([0, 1]),
               train_users=np.array([0, 1]), train_items=np.array([1]))


def test_each_metric_against_a_hand_computation():
  ranks = np.array([0, 3, 12])
  out = per_user(ranks, (10,), FULL_METRICS)
  assert list(out) == ["HR@10", "Recall@10", "NDCG@10", "MRR"]
  np.testing.assert_array_equal(out["HR@10"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(out["NDCG@10"], [1.0, 1 / np.log2(5), 0.0], rtol=1e-15)
  np.testing.assert_allclose(out["MRR"], [1.0, 1 / 4, 1 / 13], rtol=1e-15)
  assert np.mean(out["MRR"]) == pytest.approx((1 + 0.25 + 1 / 13) / 3)
  # At a cut-off of 3, rank 3 is out (0-based: the top 3 are ranks 0, 1, 2).
  np.testing.assert_array_equal(per_user(ranks, (3,), ("HR",))["HR@3"], [1.0, 0.0, 0.0])
  assert all(v.dtype == np.float64 and v.shape == (3,) for v in out.values())


def test_full_metric_keys_in_order():
  keys = list(per_user(np.arange(30), (5, 10, 20), FULL_METRICS))
  assert keys == ["HR@5", "Recall@5", "NDCG@5", "HR@10", "Recall@10", "NDCG@10",
                  "HR@20", "Recall@20", "NDCG@20", "MRR"]
  # The order of ``metrics`` is kept per cut-off; metrics without cut-off come last.
  assert list(per_user(np.arange(3), (5,), ("MRR", "NDCG", "HR"))) == [
      "NDCG@5", "HR@5", "MRR"]


def test_recall_equals_hr_with_one_held_out_item():
  ranks = np.random.default_rng(0).integers(0, 60, 500)
  out = per_user(ranks, (1, 5, 10, 50), ("HR", "Recall"))
  for k in (1, 5, 10, 50):
    np.testing.assert_array_equal(out[f"Recall@{k}"], out[f"HR@{k}"])
  assert 0 < out["HR@10"].mean() < 1


def test_hits_unchanged():
  """ranking.hits gives what it gave before the registry: same keys, order, float64 values."""
  ranks = np.random.default_rng(1).integers(0, 101, 400)
  got = ranking.hits(ranks, (5, 10, 20))
  want = {}
  for k in (5, 10, 20):
    want[f"HR@{k}"] = (ranks < k).astype(np.float64)
    want[f"NDCG@{k}"] = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == np.float64
    np.testing.assert_array_equal(got[key], want[key])  # Bit for bit.
  assert list(ranking.hits(ranks)) == list(want)  # The default cut-offs.


def test_summary_takes_the_full_metrics():
  rng = np.random.default_rng(3)
  ranks = rng.integers(0, 40, (2, 50))  # K = 2 draws.
  row = summary.row_summary(ranks, (10,), resamples=50, seed=0, metrics=FULL_METRICS)
  assert [m for m, v in row.items() if isinstance(v, float)] == [
      "HR@10", "Recall@10", "NDCG@10", "MRR"]
  assert row["MRR"] == pytest.approx(np.mean(1 / (ranks + 1.0)))
  assert row["draws"]["MRR"] == pytest.approx(list(np.mean(1 / (ranks + 1.0), axis=1)))
  default = summary.row_summary(ranks, (10,), resamples=50, seed=0)
  assert "MRR" not in default and default["HR@10"] == row["HR@10"]
  cmp = summary.comparison(ranks, ranks[::-1], (10,), resamples=50, seed=0,
                           metrics=("MRR",), rank_metrics=FULL_METRICS)
  assert cmp["MRR"]["diff"] == pytest.approx(0.0)
  with pytest.raises(KeyError):
    summary.comparison(ranks, ranks, (10,), resamples=50, seed=0, metrics=("MRR",))


def test_a_metric_file_registers_itself(tmp_path, monkeypatch):
  """Adding a metric is one file in the package: the package's import of its modules
  (``import_submodules``) registers it, and per_user computes it by name."""
  assert set(FULL_METRICS) <= set(RANK_METRICS.names())
  (tmp_path / "precision.py").write_text(
      "import numpy as np\n"
      "from jaxvars.evaluation.rank_metrics import RANK_METRICS, RankMetric\n"
      "RANK_METRICS.register('P', RankMetric(name='P', takes_k=True,\n"
      "                      fn=lambda r, k: (np.asarray(r) < k) / k))\n")
  monkeypatch.setattr(rank_metrics, "__path__", [*rank_metrics.__path__, str(tmp_path)])
  monkeypatch.setattr(RANK_METRICS, "_entries", dict(RANK_METRICS._entries))
  module = f"{rank_metrics.__name__}.precision"
  monkeypatch.delitem(sys.modules, module, raising=False)
  assert "P" not in RANK_METRICS
  try:
    import_submodules(rank_metrics.__name__, rank_metrics.__path__)  # As the package does.
  finally:
    sys.modules.pop(module, None)
  assert "P" in RANK_METRICS and {"HR", "NDCG", "Recall", "MRR"} <= set(RANK_METRICS)
  np.testing.assert_allclose(per_user(np.array([0, 7]), (5,), ("P",))["P@5"], [0.2, 0.0])
  from jaxvars.errors import ConfigError
  with pytest.raises(ConfigError, match="rank metric"):
    per_user(np.array([0]), (5,), ("nDCG",))
