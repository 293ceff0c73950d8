"""NDCG@K: 1 / log2(rank + 2) if the held-out item is in the top K (rank < K), else 0.

With one relevant item per user the ideal DCG is 1 (the item at rank 0), so NDCG = DCG
(Järvelin & Kekäläinen 2002; He et al., NCF, 2017, for leave-one-out).
"""

from __future__ import annotations

import numpy as np

from jaxvars.evaluation.rank_metrics import RANK_METRICS, RankMetric


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
  """NDCG@k per user: float64 [U] in [0, 1], of 0-based ranks int [U]."""
  ranks = np.asarray(ranks)
  return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


RANK_METRICS.register("NDCG", RankMetric(name="NDCG", takes_k=True, fn=ndcg, order=2,
                                         description="1/log2(rank+2) in the top K"))
