"""Recall@K: the share of the user's held-out items that are in the top K.

Every user here has exactly one held-out item (leave-one-out), so Recall@K is 0 or 1 and
equals HR@K user by user; it is reported under its own name because the full-ranking
literature (Krichene & Rendle, KDD 2020) quotes it, and it would differ from HR@K under a
protocol holding out several items per user.
"""

from __future__ import annotations

import numpy as np

from jaxvars.evaluation.rank_metrics import RANK_METRICS, RankMetric


def recall(ranks: np.ndarray, k: int) -> np.ndarray:
  """Recall@k per user: float64 [U] (0 or 1: one held-out item), of 0-based ranks int [U]."""
  return (np.asarray(ranks) < k).astype(np.float64)


RANK_METRICS.register("Recall", RankMetric(name="Recall", takes_k=True, fn=recall, order=1,
                                           protocols=("full",),
                                           description="held-out items in the top K "
                                           "(= HR@K with one per user)"))
