"""The full-ranking protocol: each user's held-out item ranked among every item the user did
not interact with in training (Krichene & Rendle, "On Sampled Metrics for Item
Recommendation", KDD 2020), beside the sampled protocol's 100 negatives
(:mod:`jaxvars.evaluation.ranking`).

The rank of the held-out item is the number of competitors scoring at least as high as it
(ties count against it, as in :func:`jaxvars.evaluation.ranking.positive_ranks`); the
competitors of user u are all items except u's training items and the held-out item itself.
The ranks feed :mod:`jaxvars.evaluation.summary` with ``metrics=FULL_METRICS`` (HR, Recall,
NDCG, MRR: :mod:`jaxvars.evaluation.rank_metrics`).

Scores are computed on device, a block of users at a time: users [B, 1] broadcast against
items [1, I] and features [1, I, F] inside the recommender (an item's visual term computed
once per block, as in :func:`jaxvars.evaluation.targeted.all_item_scores`), and the rank is
reduced there, so only [B] ints come back per block, never the [U, I] score matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def full_ranks(recommender, rec_params, features, *, test_items, train_users, train_items,
               batch_users: int = 128) -> np.ndarray:
  """0-based rank of each user's held-out item among all items the user did not train on.

  Args:
    recommender, rec_params: the :class:`jaxvars.recommenders.Recommender` (static,
      hashable) and its parameters.
    features: float32 [I, F] normalised item features (clean or attacked), or [K, I, F]:
      K draws of a randomised defence, each ranked on its own.
    test_items: int [U], user u's held-out item (users are 0..U-1).
    train_users, train_items: int [N], the training pairs (train_users[n], train_items[n]);
      a user's training items are not competitors (repeated pairs are fine).
    batch_users: users per jitted call (the last block is padded: one compile).

  Returns:
    int64 [U] for features [I, F], int64 [K, U] for [K, I, F]: the number of competitors
    (items not in the user's training pairs, the held-out item excluded) whose score is >=
    the held-out item's.

  Raises:
    ValueError: features not [I, F] or [K, I, F]; pairs of unequal length; a held-out item
      or training pair out of range; batch_users < 1.
  """
  features = jnp.asarray(features)
  if features.ndim not in (2, 3):
    raise ValueError(f"features must be [I, F] or [K, I, F], got shape {features.shape}")
  draws = features[None] if features.ndim == 2 else features
  num_items = draws.shape[1]
  test_items = np.asarray(test_items, np.int64)
  train_users = np.asarray(train_users, np.int64)
  train_items = np.asarray(train_items, np.int64)
  num_users = len(test_items)
  _check(test_items, train_users, train_items, num_items, batch_users)

  order = np.argsort(train_users, kind="stable")
  by_user_u, by_user_i = train_users[order], train_items[order]
  out = np.zeros((len(draws), num_users), np.int64)
  for start in range(0, num_users, batch_users):
    stop = min(start + batch_users, num_users)
    users = np.zeros(batch_users, np.int32)
    users[:stop - start] = np.arange(start, stop)
    positives = np.zeros(batch_users, np.int32)
    positives[:stop - start] = test_items[start:stop]
    # Host-built bool [B, I] of the block's training pairs (padding rows: all False).
    lo, hi = np.searchsorted(by_user_u, [start, stop], side="left")
    mask = np.zeros((batch_users, num_items), bool)
    mask[by_user_u[lo:hi] - start, by_user_i[lo:hi]] = True
    users, positives, mask = jnp.asarray(users), jnp.asarray(positives), jnp.asarray(mask)
    for k, f in enumerate(draws):
      ranks = _block_ranks(rec_params, users, positives, mask, f, recommender=recommender)
      out[k, start:stop] = np.asarray(ranks)[:stop - start]
  return out[0] if features.ndim == 2 else out


@functools.partial(jax.jit, static_argnames=("recommender",))
def _block_ranks(rec_params, users, positives, trained, f, *, recommender):
  """int32 [B]: ranks of ``positives`` (int32 [B]) among the items not ``trained`` (bool
  [B, I]) and not the positive, for ``users`` int32 [B] with item features f [I, F]."""
  items = jnp.arange(f.shape[0])
  scores = recommender.score(rec_params, users[:, None], items[None, :], f[None])  # [B, I]
  pos = jnp.take_along_axis(scores, positives[:, None], axis=1)  # [B, 1]
  competes = ~trained & (items[None, :] != positives[:, None])
  return jnp.sum(competes & (scores >= pos), axis=1, dtype=jnp.int32)


def _check(test_items, train_users, train_items, num_items: int, batch_users: int) -> None:
  """Raises ValueError on inputs :func:`full_ranks` would silently misread."""
  if batch_users < 1:
    raise ValueError(f"batch_users={batch_users} must be >= 1")
  if test_items.ndim != 1:
    raise ValueError(f"test_items must be [U], got shape {test_items.shape}")
  if train_users.shape != train_items.shape or train_users.ndim != 1:
    raise ValueError(f"train_users {train_users.shape} and train_items {train_items.shape} "
                     "must be equal-length [N] arrays")
  if len(test_items) and (test_items.min() < 0 or test_items.max() >= num_items):
    raise ValueError(f"test_items must lie in [0, {num_items}) (the feature table's items)")
  if len(train_items) and (train_items.min() < 0 or train_items.max() >= num_items):
    raise ValueError(f"train_items must lie in [0, {num_items})")
  if len(train_users) and train_users.min() < 0:
    raise ValueError("train_users must be >= 0")
