"""From per-user ranks to the reported numbers: metrics with 95% bootstrap intervals, by user
group, and paired comparisons whose effect is read from their interval.

Ranks are 0-based ranks of each user's held-out item among its candidates
(:func:`jaxvars.evaluation.ranking.positive_ranks`), [U] for a deterministic system and
[K, U] for a randomised one (K draws): its per-user hits are averaged over the draws, and
the draws' spread is reported beside.

The per-user metrics are those named by ``metrics`` (:mod:`jaxvars.evaluation.rank_metrics`):
by default the sampled protocol's HR and NDCG; the full-ranking protocol reports
``FULL_METRICS`` (HR, Recall, NDCG, MRR).
"""

from __future__ import annotations

import numpy as np

from jaxvars.evaluation import bootstrap
from jaxvars.evaluation.rank_metrics import SAMPLED_METRICS, per_user

COMPARED = ("HR@10", "NDCG@10")  # Metrics of the paired comparisons.


def user_hits(ranks: np.ndarray, ks, *, metrics=SAMPLED_METRICS) -> dict[str, np.ndarray]:
  """Per-user metrics float64 [U] of ranks [U] or [K, U] (averaged over the K draws), keyed
  as :func:`jaxvars.evaluation.rank_metrics.per_user` keys ``metrics`` ('HR@10', ...)."""
  ranks = np.asarray(ranks)
  if ranks.ndim == 1:
    return per_user(ranks, ks, metrics)
  per_draw = [per_user(r, ks, metrics) for r in ranks]
  return {m: np.mean([h[m] for h in per_draw], axis=0) for m in per_draw[0]}


def row_summary(ranks: np.ndarray, ks, *, users: np.ndarray | None = None,
                resamples: int, seed: int, metrics=SAMPLED_METRICS) -> dict:
  """{metric: value, ..., 'ci95': {metric: [lo, hi]}, 'users': n} (+ 'draws': {metric:
  [value of each draw]} for ranks [K, U]) over ``users`` (a boolean mask [U]; None = all),
  for the rank metrics named by ``metrics`` at each cut-off in ``ks``."""
  ranks = np.asarray(ranks)
  mask = np.ones(ranks.shape[-1], bool) if users is None else np.asarray(users, bool)
  picked = ranks[..., mask]
  users_values = user_hits(picked, ks, metrics=metrics)
  out = {m: float(np.mean(v)) for m, v in users_values.items()}
  out["ci95"] = {m: bootstrap.mean_ci(v, resamples=resamples, seed=seed)
                 for m, v in users_values.items()}
  out["users"] = int(mask.sum())
  if picked.ndim == 2:
    per_draw = [per_user(r, ks, metrics) for r in picked]
    out["draws"] = {m: [float(np.mean(h[m])) for h in per_draw] for m in users_values}
  return out


def comparison(ranks_a: np.ndarray, ranks_b: np.ndarray, ks, *, users=None, resamples: int,
               seed: int, metrics=COMPARED, rank_metrics=SAMPLED_METRICS) -> dict:
  """{metric: {'diff', 'ci95', 'effect'}}: metric(a) - metric(b) on the same users, paired,
  for each key of ``metrics`` (e.g. 'HR@10', 'MRR'), computed from the rank metrics named
  by ``rank_metrics`` (which must produce those keys)."""
  mask = None if users is None else np.asarray(users, bool)
  a = user_hits(np.asarray(ranks_a)[..., mask] if mask is not None else ranks_a, ks,
                metrics=rank_metrics)
  b = user_hits(np.asarray(ranks_b)[..., mask] if mask is not None else ranks_b, ks,
                metrics=rank_metrics)
  return {m: bootstrap.paired_diff_ci(a[m], b[m], resamples=resamples, seed=seed)
          for m in metrics}


def user_mean_ranks(ranks: np.ndarray) -> np.ndarray:
  """Each user's 0-based rank of the held-out item, float64 [U], of ranks [U] or [K, U]
  (averaged over the K draws)."""
  ranks = np.asarray(ranks, np.float64)
  return ranks if ranks.ndim == 1 else ranks.mean(axis=0)


def rank_comparison(ranks_a: np.ndarray, ranks_b: np.ndarray, *, users=None, resamples: int,
                    seed: int) -> dict:
  """{'diff', 'ci95', 'effect'}: the held-out item's mean rank under a minus under b, paired
  over ``users`` (a boolean mask [U]; None = all). Positive: a ranks the held-out items lower
  down the list (0 = top). Every user's rank counts, not only those near the top: a finer
  reading than HR@10 of whether one attack is stronger than another."""
  a, b = user_mean_ranks(ranks_a), user_mean_ranks(ranks_b)
  if users is not None:
    mask = np.asarray(users, bool)
    a, b = a[mask], b[mask]
  return bootstrap.paired_diff_ci(a, b, resamples=resamples, seed=seed)
