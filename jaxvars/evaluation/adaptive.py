"""The item subset that the attacks beyond the paper's transfer setting perturb, and the
splicing of its attacked features into the clean catalogue's. The attacks themselves are
conditions of the plan (:mod:`jaxvars.evaluation.plan`: kinds 'adaptive', 'whitebox',
'sanity'):

* Extra untargeted objectives (``config.attack.adaptive.objectives``: 'bpr_all',
  'feature', 'demote'), crafted on the undefended recommender and transferred to every
  system.
* White-box attacks through each defended system of ``config.attack.adaptive.systems``
  (EOT over random transforms, BPDA for quantisation), detector-aware variants
  (``detector_lambdas``) with the gated ranking (flagged uploads rejected: the item keeps
  its clean photo) and the attacked photos' pass rate, and Carlini et al.'s sanity checks
  (twice the steps; eps 64).

Each attack perturbs only the items of :func:`attack_items` (``config.eval.max_items``: the
users' held-out items first, then random others); the other items keep their clean photos
and their clean features, which are reused, not recomputed.
"""

from __future__ import annotations

import numpy as np


def attack_items(data, max_items: int, seed: int) -> np.ndarray | None:
  """The items the subset attacks perturb: every user's held-out item first (they decide
  HR@N), then random other items, ``max_items`` in all; None for every item (0)."""
  if not max_items or max_items >= data.num_items:
    return None
  rng = np.random.default_rng([seed, 13])
  tests = np.unique(data.test_items)
  if len(tests) >= max_items:
    return np.sort(rng.choice(tests, max_items, replace=False)).astype(np.int32)
  others = np.setdiff1d(np.arange(data.num_items), tests)
  extra = rng.choice(others, max_items - len(tests), replace=False)
  return np.sort(np.concatenate([tests, extra])).astype(np.int32)


def attacked_users(test_items: np.ndarray, items: np.ndarray | None) -> np.ndarray | None:
  """Boolean mask [U] of the users whose held-out item ``test_items[u]`` is among the
  attacked ``items`` (int [n]), or None where every user's is (``items`` None or a superset
  of the held-out items)."""
  if items is None:
    return None
  mask = np.isin(np.asarray(test_items), items)
  return None if mask.all() else mask


def splice(clean: np.ndarray, items: np.ndarray | None, attacked: np.ndarray) -> np.ndarray:
  """Features of a catalogue in which only ``items`` changed: the clean features [I, F] (or
  [K, I, F]) with the attacked items' rows replaced."""
  if items is None:
    return attacked
  out = np.array(clean)
  out[..., items, :] = attacked
  return out
