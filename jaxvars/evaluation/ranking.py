"""Ranking metrics (paper 4.2) and the recommender's scores of every user's candidates.

Protocol: each test user's held-out item is ranked among 100 sampled negatives. The rank
of the positive is the number of negatives scoring at least as high as it (ties count
against the positive). Then

* HR@N = 1 if rank < N else 0,
* NDCG@N = 1 / log2(rank + 2) if rank < N else 0 (one relevant item, so IDCG = 1),

averaged over users; :func:`hits` gives the per-user values (for bootstrap intervals). The
metrics are defined in :mod:`jaxvars.evaluation.rank_metrics`; the full-ranking protocol
(every item the user did not interact with) is :mod:`jaxvars.evaluation.full_ranking`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.evaluation.rank_metrics import SAMPLED_METRICS, per_user


def positive_ranks(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
  """0-based rank of each positive among its negatives, ties against the positive.

  Args:
    pos_scores: float [U]; neg_scores: float [U, n].

  Returns:
    int64 [U]: number of negatives with score >= the positive's.
  """
  pos_scores = np.asarray(pos_scores)
  return np.sum(np.asarray(neg_scores) >= pos_scores[:, None], axis=1).astype(np.int64)


def hits(ranks: np.ndarray, ks=(5, 10, 20)) -> dict[str, np.ndarray]:
  """Per-user HR@N (0/1) and NDCG@N from 0-based ranks [U], for each N in ``ks`` (the
  sampled protocol's metrics: :func:`jaxvars.evaluation.rank_metrics.per_user`).

  Returns:
    {'HR@5': float64 [U], 'NDCG@5': float64 [U], 'HR@10': ...}.
  """
  return per_user(ranks, ks, SAMPLED_METRICS)


def ranking_metrics(ranks: np.ndarray, ks=(5, 10, 20)) -> dict[str, float]:
  """HR@N and NDCG@N from 0-based ranks [U], for each N in ``ks`` (the means of :func:`hits`).

  Returns:
    {'HR@5': ..., 'NDCG@5': ..., 'HR@10': ..., ...}: Python floats in [0, 1].
  """
  return {name: float(np.mean(v)) for name, v in hits(ranks, ks).items()}


def mostpop_scores(train_items: np.ndarray, num_items: int) -> np.ndarray:
  """Most-popular baseline: each item's number of training interactions, float64 [I]."""
  return np.bincount(np.asarray(train_items), minlength=num_items).astype(np.float64)


def candidate_matrix(test_items: np.ndarray, eval_negatives: np.ndarray) -> np.ndarray:
  """[U, 1 + n] int32: the positive in column 0, then the negatives."""
  return np.concatenate([np.asarray(test_items)[:, None], eval_negatives], axis=1).astype(np.int32)


def evaluate_scores(candidate_scores: np.ndarray, ks) -> dict[str, float]:
  """Metrics of a score matrix [U, 1 + n] whose column 0 is the positive."""
  return ranking_metrics(positive_ranks(candidate_scores[:, 0], candidate_scores[:, 1:]), ks)


@functools.partial(jax.jit, static_argnames=("recommender",))
def _candidate_scores(recommender, params, users, candidates, features):
  return recommender.score(params, users[:, None], candidates, features[candidates])


def candidate_scores(recommender, params, features, candidates: np.ndarray,
                     batch_users: int) -> np.ndarray:
  """Recommender scores x_ui of every user's candidates.

  Args:
    recommender, params: the :class:`jaxvars.recommenders.Recommender` and its parameters.
    features: float32 [I, F] normalised item features (clean or attacked).
    candidates: int32 [U, C] item indices per user (row u belongs to user u).
    batch_users: users per jitted call (the last batch is padded: one compile).

  Returns:
    float32 [U, C] (host array).
  """
  num_users = len(candidates)
  out = []
  for start in range(0, num_users, batch_users):
    users = np.arange(start, min(start + batch_users, num_users), dtype=np.int32)
    cand = candidates[start:start + batch_users]
    pad = batch_users - len(users)
    if pad:
      users = np.concatenate([users, np.zeros(pad, np.int32)])
      cand = np.concatenate([cand, np.zeros((pad, cand.shape[1]), np.int32)])
    scores = _candidate_scores(recommender, params, jnp.asarray(users), jnp.asarray(cand),
                               features)
    out.append(np.asarray(scores)[:batch_users - pad])
  return np.concatenate(out, axis=0)


def format_ranking_table(ranking: dict[str, dict]) -> str:
  """A plain-text table: one row per key (``<system>/<condition>``), one column per metric
  (the float fields of the rows), and the 95% interval of HR@10 where the rows have one."""
  if not ranking:
    return "(no results)"
  first = next(iter(ranking.values()))
  metrics = [m for m, v in first.items() if isinstance(v, float)]
  with_ci = "HR@10" in first.get("ci95", {})
  width = max(len(k) for k in ranking) + 2
  cols = [max(9, len(m) + 2) for m in metrics]
  head = "".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))
  lines = [head + ("   HR@10 95% CI" if with_ci else "")]
  for key, row in ranking.items():
    cells = []
    for m, c in zip(metrics, cols):
      v = row.get(m)
      cells.append(f"{v:{c}.4f}" if isinstance(v, float) and not math.isnan(v) else "n/a".rjust(c))
    ci = row.get("ci95", {}).get("HR@10")
    lines.append(key.ljust(width) + "".join(cells)
                 + (f"   [{ci[0]:.4f}, {ci[1]:.4f}]" if with_ci and ci else ""))
  return "\n".join(lines)
