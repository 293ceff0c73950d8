"""MRR (mean reciprocal rank): 1 / (rank + 1) of the held-out item, over the whole list (no
cut-off), so every user's rank counts."""

from __future__ import annotations

import numpy as np

from jaxvars.evaluation.rank_metrics import RANK_METRICS, RankMetric


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
  """1 / (rank + 1) per user: float64 [U] in (0, 1], of 0-based ranks int [U]."""
  return 1.0 / (np.asarray(ranks) + 1.0)


RANK_METRICS.register("MRR", RankMetric(name="MRR", takes_k=False, fn=reciprocal_rank, order=3,
                                        protocols=("full",),
                                        description="1/(rank+1), no cut-off"))
