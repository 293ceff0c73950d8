"""Detection metrics (paper 4.2, Table 4, Figures 8-10): accuracy at a threshold set on
clean calibration items, ROC AUC, TPR at a false-positive rate, the ROC curve."""

from __future__ import annotations

import numpy as np


def roc_auc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float:
  """Area under the ROC curve of "score > t means adversarial" (Mann-Whitney U; ties count 1/2).

  Args:
    clean_scores: [n0] scores of clean inputs (label 0); adv_scores: [n1] (label 1).
  """
  clean_scores, adv_scores = np.asarray(clean_scores, float), np.asarray(adv_scores, float)
  values = np.concatenate([clean_scores, adv_scores])
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  order = np.argsort(values, kind="mergesort")
  ranks = np.empty(len(values))
  ranks[order] = np.arange(1, len(values) + 1)
  ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # Average rank of ties.
  n0, n1 = len(clean_scores), len(adv_scores)
  return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def detection_metrics(*, calibration_clean: np.ndarray, clean: np.ndarray, adversarial: np.ndarray,
                      fpr: float) -> dict[str, float]:
  """Detection quality on a balanced held-out set.

  The threshold is the (1 - fpr) quantile of ``calibration_clean`` (clean items apart
  from the evaluation set), so about ``fpr`` of clean inputs are flagged.

  Args:
    calibration_clean: [m] scores of clean calibration inputs.
    clean, adversarial: [n] scores of held-out clean inputs and their attacked versions.
    fpr: target false-positive rate.

  Returns:
    {'accuracy' (balanced set, at the deployed threshold), 'roc_auc', 'threshold',
    'fpr_at_threshold', 'tpr_at_threshold' (the deployed threshold's rates on the held-out
    items), 'oracle_tpr@fpr=<fpr>' (TPR at a threshold taken from the held-out clean
    scores themselves: an oracle operating point, not one a deployment could choose)}.
  """
  threshold = float(np.quantile(calibration_clean, 1.0 - fpr))
  tpr_at = float(np.mean(adversarial > threshold))
  fpr_at = float(np.mean(clean > threshold))
  roc_threshold = np.quantile(clean, 1.0 - fpr)
  return {"accuracy": 0.5 * (tpr_at + 1.0 - fpr_at), "roc_auc": roc_auc(clean, adversarial),
          f"oracle_tpr@fpr={fpr:g}": float(np.mean(adversarial > roc_threshold)),
          "threshold": threshold, "fpr_at_threshold": fpr_at, "tpr_at_threshold": tpr_at}


def roc_curve(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) [n + 2] of the score threshold sweep (adversarial = positive, score above)."""
  thresholds = np.unique(np.concatenate([clean, adversarial]))[::-1]
  fpr = np.concatenate([[0.0], [(clean >= t).mean() for t in thresholds], [1.0]])
  tpr = np.concatenate([[0.0], [(adversarial >= t).mean() for t in thresholds], [1.0]])
  return fpr, tpr
