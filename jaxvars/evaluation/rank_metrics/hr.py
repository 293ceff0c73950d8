"""HR@K (hit rate): 1 if the held-out item is in the user's top K (rank < K), else 0."""

from __future__ import annotations

import numpy as np

from jaxvars.evaluation.rank_metrics import RANK_METRICS, RankMetric


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
  """HR@k per user: float64 [U], 1.0 where rank < k, of 0-based ranks int [U]."""
  return (np.asarray(ranks) < k).astype(np.float64)


RANK_METRICS.register("HR", RankMetric(name="HR", takes_k=True, fn=hit_rate, order=0,
                                       description="held-out item in the top K"))
