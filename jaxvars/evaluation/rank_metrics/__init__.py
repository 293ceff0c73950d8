"""Per-user rank metrics, chosen by name: the one place where a metric of a held-out item's
rank is defined.

A metric maps 0-based ranks of each user's held-out item (int [U]; 0 = top of the list, ties
counted against the item: :func:`jaxvars.evaluation.ranking.positive_ranks`,
:func:`jaxvars.evaluation.full_ranking.full_ranks`) to one value per user, float64 [U],
either at a cut-off K (HR@K, NDCG@K, Recall@K) or over the whole list (MRR). Reported
numbers are their means over users (with bootstrap intervals:
:mod:`jaxvars.evaluation.summary`).

One file per metric, each registering a :class:`RankMetric` in ``RANK_METRICS``; every
module of this package is imported here, so a new metric is one new file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxvars.registry import Registry, import_submodules

RANK_METRICS = Registry("rank metric")

PROTOCOLS = ("sampled", "full")


@dataclasses.dataclass(frozen=True)
class RankMetric:
  """A registered metric.

  Attributes:
    name: the registry name, and the prefix of its result keys ('HR' -> 'HR@10'; a metric
      without cut-off is keyed by its name alone: 'MRR').
    takes_k: the metric has a cut-off K (``fn(ranks, k)``); else ``fn(ranks)``.
    fn: ``(ranks int [U][, k int]) -> float64 [U]``, one value per user.
    description: one line for the report.
    protocols: the protocols whose tables report it: 'sampled' (the held-out item among
      the saved negatives, the paper's) and 'full' (among every item the user did not buy).
    order: its place among a protocol's metrics (lower first; keys of one cut-off follow it).
  """
  name: str
  takes_k: bool
  fn: Callable[..., np.ndarray]
  description: str = ""
  protocols: tuple[str, ...] = PROTOCOLS
  order: int = 100


def metrics_for(protocol: str) -> tuple[str, ...]:
  """The registered metrics a protocol reports ('sampled' | 'full'), in their order."""
  entries = [RANK_METRICS.get(n) for n in RANK_METRICS.names()]
  return tuple(e.name for e in sorted(entries, key=lambda e: (e.order, e.name))
               if protocol in e.protocols)


def per_user(ranks: np.ndarray, ks: Sequence[int],
             metrics: Sequence[str] = ("HR", "NDCG")) -> dict[str, np.ndarray]:
  """Per-user values of ``metrics`` at each cut-off in ``ks``, from 0-based ranks.

  Args:
    ranks: int [U], each user's 0-based rank of the held-out item.
    ks: the cut-offs K (of the metrics that take one).
    metrics: registered names (``RANK_METRICS``).

  Returns:
    {key: float64 [U]}, in this order: for each k in ``ks``, each cut-off metric in the
    order of ``metrics`` ('HR@5', 'NDCG@5', 'HR@10', ...); then the metrics without
    cut-off ('MRR').

  Raises:
    ConfigError: an unknown metric name.
  """
  ranks = np.asarray(ranks)
  entries = [RANK_METRICS.get(m, "metrics") for m in metrics]
  out = {}
  for k in ks:
    for e in entries:
      if e.takes_k:
        out[f"{e.name}@{k}"] = e.fn(ranks, k)
  for e in entries:
    if not e.takes_k:
      out[e.name] = e.fn(ranks)
  return out


import_submodules(__name__, __path__)

# Metrics of the sampled protocol (100 negatives; the paper's HR@N and NDCG@N), and of the
# full-ranking protocol (every item the user did not interact with; Krichene & Rendle, "On
# Sampled Metrics for Item Recommendation", KDD 2020): a metric file says which it joins.
SAMPLED_METRICS = metrics_for("sampled")
FULL_METRICS = metrics_for("full")
