"""Interaction preprocessing, leave-one-out splitting and negative sampling.

Pure numpy functions of their inputs; randomness comes from an explicit
``numpy.random.Generator``. Users and items are contiguous int32 indices.
Source: paper section 4.1-4.2 (binary implicit feedback, users with fewer than
5 interactions removed, one random held-out item per user, 100 sampled
negatives the user never touched).
"""

from __future__ import annotations

import numpy as np


def binarize(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
             ratings: np.ndarray | None = None, *, min_rating: float = 0.0):
  """Turns raw interaction rows into unique (user, item) pairs.

  Args:
    users, items: [N] int, raw rows (repeats allowed).
    timestamps: [N] int64; -1 where unknown (other negative values are dates before 1970).
    ratings: [N] float or None; rows with ``rating < min_rating`` are dropped.

  Returns:
    (users, items, timestamps): [M] arrays, one row per distinct pair, sorted by
    (user, item); the timestamp is the latest known one of the pair's rows (-1 only where
    none of them has one).
  """
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  timestamps = np.asarray(timestamps, np.int64)
  if ratings is not None:
    keep = np.asarray(ratings) >= min_rating
    users, items, timestamps = users[keep], items[keep], timestamps[keep]
  known_first = np.where(timestamps == -1, np.iinfo(np.int64).min, timestamps)  # -1: unknown.
  order = np.lexsort((known_first, items, users))  # Last row of each pair = latest timestamp.
  users, items, timestamps = users[order], items[order], timestamps[order]
  last = np.ones(len(users), bool)
  if len(users):
    last[:-1] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
  return users[last], items[last], timestamps[last]


def users_with_min_items(users: np.ndarray, min_items: int) -> np.ndarray:
  """Boolean mask [M] of the pairs whose user has at least ``min_items`` distinct items.

  ``users`` must come from :func:`binarize` (one row per distinct pair).
  """
  _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
  return counts[inverse] >= min_items


def leave_one_out(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_users: int,
                  *, mode: str, rng: np.random.Generator):
  """Holds out one item per user.

  Args:
    users, items, timestamps: [M] distinct pairs with users in [0, num_users), every
      user present with at least 2 items.
    mode: 'random' (uniform choice, paper 4.1) or 'time' (the latest item; ties
      broken at random).
    rng: the generator of the random choices.

  Returns:
    (train_users [M - U] int32, train_items [M - U] int32, test_items [U] int32).

  Raises:
    ValueError: if a user has fewer than 2 items, or mode is unknown.
  """
  users = np.asarray(users)
  counts = np.bincount(users, minlength=num_users)
  if counts.min(initial=2) < 2:
    raise ValueError(f"user {int(np.argmin(counts))} has {counts.min()} items; leave-one-out "
                     "needs at least 2")
  noise = rng.random(len(users))
  if mode == "random":
    keys = (noise, users)
  elif mode == "time":
    keys = (noise, np.asarray(timestamps, np.int64), users)  # The noise only breaks ties.
  else:
    raise ValueError(f"leave-one-out mode {mode!r} is not 'random' or 'time'")
  order = np.lexsort(keys)
  last = np.ones(len(users), bool)
  last[:-1] = users[order][1:] != users[order][:-1]
  held = order[last]  # One row per user, in user order.
  test_items = np.asarray(items)[held].astype(np.int32)
  train = np.ones(len(users), bool)
  train[held] = False
  return users[train].astype(np.int32), np.asarray(items)[train].astype(np.int32), test_items


def pair_keys(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
  """Sorted int64 keys ``user * num_items + item`` for membership tests."""
  return np.sort(np.asarray(users, np.int64) * num_items + np.asarray(items, np.int64))


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Boolean mask: which ``keys`` are in ``sorted_keys``."""
  if len(sorted_keys) == 0:
    return np.zeros(np.shape(keys), bool)
  pos = np.searchsorted(sorted_keys, keys)
  pos = np.minimum(pos, len(sorted_keys) - 1)
  return sorted_keys[pos] == keys


def sample_eval_negatives(train_users, train_items, test_items: np.ndarray, num_items: int,
                          num_negatives: int, *, rng: np.random.Generator) -> np.ndarray:
  """Samples evaluation negatives without replacement from items each user never touched.

  Args:
    train_users, train_items: [N] training pairs.
    test_items: [U] the held-out item of each user.
    num_items: catalogue size I.
    num_negatives: negatives per user (paper: 100).

  Returns:
    int32 [U, num_negatives]; row u holds distinct items outside u's train and test items.

  Raises:
    ValueError: naming the first user with fewer than ``num_negatives`` untouched items.
  """
  num_users = len(test_items)
  touched = [[] for _ in range(num_users)]
  for u, i in zip(np.asarray(train_users).tolist(), np.asarray(train_items).tolist()):
    touched[u].append(i)
  out = np.empty((num_users, num_negatives), np.int32)
  for u in range(num_users):
    t = np.unique(np.asarray(touched[u] + [int(test_items[u])], np.int64))
    free = num_items - len(t)
    if free < num_negatives:
      raise ValueError(f"user {u} touched {len(t)} of {num_items} items, leaving {free} "
                       f"untouched; {num_negatives} evaluation negatives are needed")
    k = rng.choice(free, size=num_negatives, replace=False)
    # Map the k-th untouched item to its item index: skip the touched items below it.
    shift = t - np.arange(len(t))  # Untouched items below touched item t[m] = shift[m].
    out[u] = k + np.searchsorted(shift, k, side="right")
  return out


def sample_train_negatives(users: np.ndarray, num_items: int, positive_keys: np.ndarray,
                           *, rng: np.random.Generator, max_rounds: int = 100) -> np.ndarray:
  """BPR negatives: for each user, an item drawn uniformly from items not in its training set.

  Args:
    users: [B] int user indices.
    positive_keys: :func:`pair_keys` of the training pairs.

  Returns:
    int32 [B].
  """
  users = np.asarray(users, np.int64)
  neg = rng.integers(0, num_items, len(users))
  for _ in range(max_rounds):
    bad = contains(positive_keys, users * num_items + neg)
    if not bad.any():
      return neg.astype(np.int32)
    neg[bad] = rng.integers(0, num_items, int(bad.sum()))
  raise ValueError("could not sample BPR negatives: some user touched nearly every item")


def item_triplets(items: np.ndarray, *, train_users: np.ndarray, train_items: np.ndarray,
                  num_users: int, num_items: int, positive_keys: np.ndarray,
                  per_role: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Training triplets (u, i, j) in which each given item takes part, for attacks and the
  defence's recommendation loss (paper eq. 3 restricted to a batch of item images).

  For each item k: ``per_role`` triplets with k as the positive (u drawn from k's
  training buyers, j a sampled BPR negative of u; masked out when k has no buyer),
  and ``per_role`` triplets with k as the negative (u a random user who never bought
  k in training, i one of u's training items).

  Args:
    items: int [B] item indices.
    train_users, train_items: [N] training pairs. positive_keys: their :func:`pair_keys`.
    per_role: triplets per item and role.

  Returns:
    {'pos_users', 'pos_negs', 'pos_mask', 'neg_users', 'neg_pos'}: [B, per_role] arrays
    (int32; the mask float32).
  """
  items = np.asarray(items, np.int64)
  b = len(items)
  order = np.argsort(train_items, kind="stable")
  sorted_items, sorted_users = train_items[order], train_users[order]
  start = np.searchsorted(sorted_items, items, side="left")
  count = np.searchsorted(sorted_items, items, side="right") - start
  pick = start[:, None] + (rng.random((b, per_role)) * np.maximum(count, 1)[:, None]).astype(np.int64)
  pos_users = sorted_users[np.minimum(pick, len(sorted_users) - 1)].astype(np.int64)
  pos_mask = np.broadcast_to((count > 0)[:, None], (b, per_role)).astype(np.float32)
  pos_users = np.where(pos_mask > 0, pos_users, 0)
  pos_negs = sample_train_negatives(pos_users.reshape(-1), num_items, positive_keys,
                                    rng=rng).reshape(b, per_role)

  neg_users = rng.integers(0, num_users, (b, per_role))
  for _ in range(100):
    bought = contains(positive_keys, neg_users * num_items + items[:, None])
    if not bought.any():
      break
    neg_users[bought] = rng.integers(0, num_users, int(bought.sum()))
  order_u = np.argsort(train_users, kind="stable")
  su, si = train_users[order_u], train_items[order_u]
  ustart = np.searchsorted(su, neg_users, side="left")
  ucount = np.searchsorted(su, neg_users, side="right") - ustart
  upick = ustart + (rng.random(neg_users.shape) * np.maximum(ucount, 1)).astype(np.int64)
  neg_pos = si[np.minimum(upick, len(si) - 1)]
  return {"pos_users": pos_users.astype(np.int32), "pos_negs": pos_negs.astype(np.int32),
          "pos_mask": pos_mask, "neg_users": neg_users.astype(np.int32),
          "neg_pos": neg_pos.astype(np.int32)}
