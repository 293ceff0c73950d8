"""HR@N / NDCG@N against rankings computed by hand."""

import math

import numpy as np
import pytest

from jaxvars.evaluation import ranking as ev


def test_ranks_count_ties_against_the_positive():
  pos = np.array([0.5, 0.9, 0.1, 2.0])
  neg = np.array([[0.1, 0.5, 0.7],   # one higher, one tie -> rank 2
                  [0.1, 0.2, 0.3],   # rank 0
                  [0.1, 0.1, 0.1],   # all tie -> rank 3
                  [3.0, 2.5, 1.0]])  # rank 2
  np.testing.assert_array_equal(ev.positive_ranks(pos, neg), [2, 0, 3, 2])


def test_hr_and_ndcg_by_hand():
  ranks = np.array([0, 1, 4, 5, 9, 10, 19, 20, 100])
  m = ev.ranking_metrics(ranks, ks=(5, 10, 20))
  # HR@5: ranks < 5 -> 0, 1, 4 -> 3 of 9.
  assert m["HR@5"] == pytest.approx(3 / 9)
  assert m["HR@10"] == pytest.approx(5 / 9)
  assert m["HR@20"] == pytest.approx(7 / 9)
  ndcg5 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)) / 9
  assert m["NDCG@5"] == pytest.approx(ndcg5)
  ndcg10 = ndcg5 + (1 / math.log2(7) + 1 / math.log2(11)) / 9
  assert m["NDCG@10"] == pytest.approx(ndcg10)
  ndcg20 = ndcg10 + (1 / math.log2(12) + 1 / math.log2(21)) / 9
  assert m["NDCG@20"] == pytest.approx(ndcg20)


def test_perfect_and_random_rankers():
  rng = np.random.default_rng(0)
  neg = rng.normal(size=(4000, 100))
  perfect = ev.ranking_metrics(ev.positive_ranks(np.full(4000, 10.0), neg), ks=(10,))
  assert perfect == {"HR@10": 1.0, "NDCG@10": 1.0}
  random_pos = rng.normal(size=4000)
  rand = ev.ranking_metrics(ev.positive_ranks(random_pos, neg), ks=(10,))
  assert rand["HR@10"] == pytest.approx(10 / 101, abs=0.02)  # 101 candidates.


def test_mostpop_ties_with_unseen_items_count_against():
  # Item 0 bought twice, item 1 once, items 2-3 never.
  pop = ev.mostpop_scores(np.array([0, 0, 1]), num_items=4)
  np.testing.assert_array_equal(pop, [2, 1, 0, 0])
  cands = ev.candidate_matrix(np.array([2, 0]), np.array([[3, 1], [2, 3]]))
  # User 0: positive 2 (pop 0) ties with 3 and loses to 1 -> rank 2. User 1: rank 0.
  np.testing.assert_array_equal(ev.positive_ranks(pop[cands][:, 0], pop[cands][:, 1:]), [2, 0])


def test_table_lists_every_row():
  table = ev.format_ranking_table({"mostpop/clean": {"HR@10": 0.1}, "vbpr/clean": {"HR@10": 0.25}})
  assert "vbpr/clean" in table and "0.2500" in table and "HR@10" in table
