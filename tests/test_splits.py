"""Split and sampling invariants, on hand-made and randomly generated interactions."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxvars.data import splits


def test_binarize_dedups_and_keeps_latest_timestamp():
  u = np.array([0, 0, 0, 1, 1])
  i = np.array([5, 5, 3, 5, 5])
  t = np.array([10, 30, 20, 7, 1])
  r = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
  bu, bi, bt = splits.binarize(u, i, t, r, min_rating=0.5)
  assert list(zip(bu, bi, bt)) == [(0, 3, 20), (0, 5, 30), (1, 5, 7)]


def test_min_items_filter():
  u = np.array([0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(splits.users_with_min_items(u, 2), [1, 1, 1, 1, 1, 0])


def test_time_split_holds_out_latest():
  u = np.array([0, 0, 0, 1, 1])
  i = np.array([1, 2, 3, 4, 5])
  t = np.array([5, 9, 1, 3, 2])
  _, _, test = splits.leave_one_out(u, i, t, 2, mode="time", rng=np.random.default_rng(0))
  np.testing.assert_array_equal(test, [2, 4])


@st.composite
def interactions(draw):
  num_users = draw(st.integers(1, 12))
  num_items = draw(st.integers(120, 200))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(num_users):
    n = int(rng.integers(2, 15))
    rows += [(u, int(x), int(rng.integers(0, 50))) for x in rng.choice(num_items, n, replace=False)]
  u, i, t = map(np.array, zip(*rows))
  return num_users, num_items, u, i, t, seed


@settings(max_examples=40, deadline=None)
@given(interactions(), st.sampled_from(["random", "time"]))
def test_leave_one_out_and_negatives_invariants(case, mode):
  num_users, num_items, u, i, t, seed = case
  rng = np.random.default_rng(seed)
  tu, ti, test = splits.leave_one_out(u, i, t, num_users, mode=mode, rng=rng)
  assert len(test) == num_users and len(tu) == len(u) - num_users
  train_pairs = set(zip(tu.tolist(), ti.tolist()))
  all_pairs = set(zip(u.tolist(), i.tolist()))
  for user in range(num_users):
    assert (user, int(test[user])) in all_pairs        # The test item is a real interaction...
    assert (user, int(test[user])) not in train_pairs  # ...never in training.
  assert train_pairs | {(k, int(x)) for k, x in enumerate(test)} == all_pairs
  if mode == "time":
    for user in range(num_users):
      assert t[(u == user) & (i == test[user])][0] == t[u == user].max()

  neg = splits.sample_eval_negatives(tu, ti, test, num_items, 100, rng=rng)
  assert neg.shape == (num_users, 100)
  for user in range(num_users):
    row = neg[user].tolist()
    assert len(set(row)) == 100                                  # Without replacement.
    assert all(0 <= x < num_items for x in row)
    touched = {x for (v, x) in all_pairs if v == user}
    assert not touched & set(row)                                # Never interacted.

  keys = splits.pair_keys(tu, ti, num_items)
  users = np.repeat(np.arange(num_users), 50)
  j = splits.sample_train_negatives(users, num_items, keys, rng=rng)
  assert not any((a, b) in train_pairs for a, b in zip(users.tolist(), j.tolist()))


def test_too_few_untouched_items_is_an_error():
  u = np.repeat([0], 6)
  i = np.arange(6)
  tu, ti, test = splits.leave_one_out(u, i, np.zeros(6), 1, mode="random",
                                      rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="user 0 touched 6 of 50 items"):
    splits.sample_eval_negatives(tu, ti, test, 50, 100, rng=np.random.default_rng(0))


def test_negatives_are_deterministic_for_a_seed():
  u = np.repeat(np.arange(3), 5)
  i = np.arange(15)
  def run():
    rng = np.random.default_rng(7)
    tu, ti, test = splits.leave_one_out(u, i, np.zeros(15), 3, mode="random", rng=rng)
    return test, splits.sample_eval_negatives(tu, ti, test, 300, 100, rng=rng)
  a, b = run(), run()
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
