"""Bootstrap intervals: coverage of a known value in a seeded simulation, pairing, and the
effect rule."""

import numpy as np
import pytest

from jaxvars.evaluation import bootstrap
from jaxvars.evaluation.detection import roc_auc


def test_mean_interval_covers_the_true_rate_about_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  p, n, sims = 0.25, 400, 200
  covered = 0
  for s in range(sims):
    lo, hi = bootstrap.mean_ci(rng.random(n) < p, resamples=400, seed=s)
    covered += lo <= p <= hi
  assert 0.90 <= covered / sims <= 0.99, covered / sims


def test_paired_interval_covers_the_true_difference_and_is_narrower_than_unpaired():
  rng = np.random.default_rng(1)
  sims, n, covered, widths = 150, 300, 0, []
  for s in range(sims):
    base = rng.random(n) < 0.4  # A user's hit under one system...
    flip = rng.random(n) < 0.1  # ...and under another: 10% of users lose theirs.
    other = base & ~flip
    true = -0.4 * 0.1
    r = bootstrap.paired_diff_ci(other, base, resamples=400, seed=s)
    covered += r["ci95"][0] <= true <= r["ci95"][1]
    widths.append(r["ci95"][1] - r["ci95"][0])
  assert 0.88 <= covered / sims <= 0.995, covered / sims
  lo_a, hi_a = bootstrap.mean_ci(other, resamples=400)
  lo_b, hi_b = bootstrap.mean_ci(base, resamples=400)
  assert np.mean(widths) < (hi_a - lo_a) + (hi_b - lo_b)  # Pairing removes the shared noise.


def test_effect_rule():
  a = np.r_[np.ones(500), np.zeros(500)]
  assert bootstrap.paired_diff_ci(a, a)["effect"] == "none"
  assert bootstrap.paired_diff_ci(a, np.zeros(1000))["effect"] == "higher"
  assert bootstrap.paired_diff_ci(np.zeros(1000), a)["effect"] == "lower"
  with pytest.raises(ValueError, match="differ in shape"):
    bootstrap.paired_diff_ci(a, a[:10])


def test_statistic_interval_of_roc_auc_contains_the_estimate():
  rng = np.random.default_rng(2)
  clean, adv = rng.normal(0, 1, 300), rng.normal(1, 1, 300)
  lo, hi = bootstrap.statistic_ci(roc_auc, clean, adv, resamples=200)
  assert lo < roc_auc(clean, adv) < hi and 0.6 < lo < hi < 0.9
