"""Bootstrap confidence intervals (Efron & Tibshirani 1993): every compared number gets a
95% interval, and a difference counts as an effect only when its interval excludes 0.

* :func:`mean_ci`: a per-unit metric (per user: HR@N, NDCG@N) resampled over units.
* :func:`paired_diff_ci`: the difference of two metrics on the *same* units, resampled
  with the same indices for both (paired), e.g. a defended system vs VBPR over users.
* :func:`statistic_ci`: any statistic of one or several per-unit arrays (detection accuracy
  or ROC AUC over items), resampled jointly.

Percentile intervals over ``resamples`` seeded resamples (default 1,000).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000


def resample_indices(n: int, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
  """int64 [resamples, n]: indices drawn with replacement (the same for the same seed)."""
  return np.random.default_rng([seed, n]).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> list[float]:
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return [float(lo), float(hi)]


def mean_ci(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
            level: float = 0.95) -> list[float]:
  """[lo, hi]: the ``level`` percentile interval of the mean of ``values`` [n]."""
  values = np.asarray(values, np.float64)
  idx = resample_indices(len(values), resamples=resamples, seed=seed)
  return _percentiles(values[idx].mean(axis=1), level)


def paired_diff_ci(a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   level: float = 0.95) -> dict:
  """The difference ``mean(a) - mean(b)`` of two per-unit arrays [n] on the same units.

  Returns:
    {'diff': float, 'ci95': [lo, hi], 'effect': 'higher' | 'lower' | 'none'} ('none' when
    the interval contains 0).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
  d = a - b
  idx = resample_indices(len(d), resamples=resamples, seed=seed)
  lo, hi = _percentiles(d[idx].mean(axis=1), level)
  effect = "higher" if lo > 0 else "lower" if hi < 0 else "none"
  return {"diff": float(d.mean()), "ci95": [lo, hi], "effect": effect}


def statistic_ci(statistic: Callable[..., float], *arrays, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> list[float]:
  """[lo, hi] of ``statistic(*arrays)`` with each array [n_k] resampled independently
  (e.g. clean and attacked detector scores for the ROC AUC)."""
  arrays = [np.asarray(a) for a in arrays]
  draws = [resample_indices(len(a), resamples=resamples, seed=seed + 7919 * k)
           for k, a in enumerate(arrays)]
  values = [statistic(*(a[d[r]] for a, d in zip(arrays, draws))) for r in range(resamples)]
  return _percentiles(np.asarray(values, np.float64), level)
