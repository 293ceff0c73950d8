"""Outcomes of the science on the shared tiny run (conftest.tiny_run: configs/joint.py:tiny,
eps 4 and 8; seeded, so every number below is deterministic): an attack lowers VBPR's HR@10,
the denoiser's system beats VBPR under the transferred attack, the detector beats chance,
and the worst case per system is not above any single attack.

Each test states the numbers it saw at this seed and the margin its assertion holds by.
Where results.json holds a paired comparison with a 95% interval (bootstrap over users), the
claim is that the interval excludes 0. The claims that do not hold at the tiny preset are
marked ``xfail(strict=True)`` with the numbers, and what a larger preset was measured to give;
strict, so that they fail (XPASS) the day they hold and the mark must go.
"""

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.xdist_group("tiny_run")]  # One worker computes the shared run.

EPS = 8  # The tiny run's largest eps: the paper's setting.

# Why the tiny preset is too small for three claims: 60 users give a 95% interval of about
# +-0.1 on a paired difference of HR@10; PGD's 2 steps of 2/255 from a random start stay
# inside eps 8 (its BPR loss rises 2.762 -> 2.778); the defence trains on 32 items an epoch,
# so D stays close to the identity and the detector close to chance. The larger preset
# measured (same seeds) makes two of them hold; the numbers are in the reasons below.
PROPOSAL = ("configs/joint.py tiny: synthetic.num_users 60 -> 300, recommender.epochs 4 -> 20 "
            "(lr_drop_epochs 4), attack.pgd_steps 2 -> 5, defense.items_per_epoch 32 -> 128, "
            "and the tiny run's eval_eps (4, 8) -> (8, 16)")


def _cmp(results, a, b, metric="HR@10"):
  """The paired difference metric(a) - metric(b) on all users: (diff, (lo, hi))."""
  c = results["comparisons"][f"{a} - {b}"]["all"][metric]
  return c["diff"], tuple(c["ci95"])


def test_fgsm_lowers_vbpr_hit_rate(tiny_run):
  """At this seed: clean 0.167 vs FGSM@8 0.050 (7 of 60 users lose the held-out item from the
  top 10); the assertion (a drop of at least 3 users, 0.05) holds by 0.067 (4 users). The
  paired interval, [-0.217, +0.000], only reaches 0: by the interval rule not yet an effect
  (PGD's claim below asks for that)."""
  _, _, results = tiny_run
  clean = results["ranking"]["vbpr/clean"]["HR@10"]
  attacked = results["ranking"][f"vbpr/fgsm@{EPS}"]["HR@10"]
  diff, (lo, hi) = _cmp(results, f"vbpr/fgsm@{EPS}", "vbpr/clean")
  assert diff == pytest.approx(attacked - clean)
  assert diff <= -0.05, (f"FGSM@{EPS} should lower VBPR's HR@10 by at least 0.05: clean "
                         f"{clean:.3f}, attacked {attacked:.3f}, paired diff {diff:+.3f} "
                         f"[{lo:+.3f}, {hi:+.3f}]")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "tiny preset: VBPR clean 0.167 vs PGD@8 0.167, paired diff +0.000 [-0.117, +0.100]; PGD@4 "
    "0.183. Measured with " + PROPOSAL + ": PGD@16 lowers HR@10 by 0.070 [-0.133, -0.027] "
    "(PGD@8: -0.020 [-0.067, +0.030], still not)"))
def test_pgd_lowers_vbpr_hit_rate(tiny_run):
  """The paper's headline attack: transferred PGD lowers VBPR's HR@10 against clean photos,
  with the paired interval below 0."""
  _, _, results = tiny_run
  diff, (lo, hi) = _cmp(results, f"vbpr/pgd@{EPS}", "vbpr/clean")
  assert hi < 0.0, f"PGD@{EPS} vs clean, VBPR's HR@10: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "tiny preset: defended/pgd@8 0.167 = vbpr/pgd@8 0.167 for every user, paired diff +0.000 "
    "[+0.000, +0.000] (the denoiser, trained on 32 items an epoch, hardly changes a feature). "
    "Not reached with " + PROPOSAL + " either: +0.000 [-0.020, +0.023] at PGD@16; with also "
    "stages.denoiser_fgsm.epochs 6 and denoiser_mix 3, +0.007 [-0.023, +0.040] (FGSM@8: +0.030 "
    "[-0.003, +0.057]): the defence needs more training than a tiny run affords"))
def test_defence_beats_vbpr_under_transferred_pgd(tiny_run):
  """The denoiser's system scores above plain VBPR under the PGD crafted on VBPR (the
  paper's transfer setting), with the paired interval above 0."""
  _, _, results = tiny_run
  diff, (lo, hi) = _cmp(results, f"defended/pgd@{EPS}", f"vbpr/pgd@{EPS}")
  assert lo > 0.0, f"defended vs VBPR under PGD@{EPS}, HR@10: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _auc(clean, adversarial):
  """ROC AUC as the share of (attacked, clean) pairs the score orders right (ties 1/2)."""
  a, c = np.asarray(adversarial, np.float64)[:, None], np.asarray(clean, np.float64)[None]
  return float(np.mean((a > c) + 0.5 * (a == c)))


def test_detection_beats_chance(tiny_run):
  """At this seed, on 40 held-out items: ROC AUC 0.562 (PGD@8) and 0.542 (FGSM@8); the
  assertion (above 0.52) holds by 0.042 and 0.022, and above chance (0.5) by 0.062 and
  0.042. The AUC is recomputed here from the raw detector scores (every pair compared)."""
  _, workdir, results = tiny_run
  import os
  with np.load(os.path.join(workdir, "artifacts.npz")) as art:
    clean = art["detector/clean"]
    for attack in (f"pgd@{EPS}", f"fgsm@{EPS}"):
      row = results["detection"][attack]
      auc = _auc(clean, art[f"detector/{attack}"])
      assert row["roc_auc"] == pytest.approx(auc, abs=1e-12), attack
      assert row["items"] == len(clean) == 40
      assert auc > 0.52, f"detection of {attack}: ROC AUC {auc:.3f} (chance: 0.5)"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "tiny preset: PGD@8's ROC AUC 0.562 has the interval [0.447, 0.676] (40 items; the "
    "detector trains on 32 items an epoch). With " + PROPOSAL + ": 0.736 [0.642, 0.841] at "
    "PGD@8, 0.843 [0.748, 0.922] at PGD@16; with also stages.denoiser_fgsm.epochs 6 and "
    "denoiser_mix 3, 0.889 [0.822, 0.955] at PGD@8"))
def test_detection_interval_excludes_chance(tiny_run):
  _, _, results = tiny_run
  row = results["detection"][f"pgd@{EPS}"]
  lo, hi = row["ci95"]["roc_auc"]
  assert lo > 0.5, f"PGD@{EPS} ROC AUC {row['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def test_worst_case_is_not_above_any_single_attack(tiny_run):
  """The worst case per system (results['robust']: a user is a hit only if every attack at
  eps 8 leaves the held-out item in the top N) is at most every single attack's row on the
  same users (the attacked users: 'ranking_attacked'), for every metric, and equals the
  per-user maximum rank recomputed from the artifacts.

  At this seed, HR@10 worst case vs the system's strongest single attack (the lowest): vbpr 0.019 vs
  0.056 (FGSM@8; margin 0.037), defended 0.019 vs 0.074 (0.056), defended_rand 0.093 vs
  0.102 (0.009, half a user over 2 draws), jpeg 0.093 vs 0.167 (0.074), bit_depth 0.019 vs
  0.056 (0.037)."""
  config, workdir, results = tiny_run
  import os
  systems = {k.split("/")[0] for k in results["ranking"]} - {"mostpop"}
  assert set(results["robust"]) == {s for s in systems if "+gate" not in s}
  attacked_users = results["users"]["attacked"]
  with np.load(os.path.join(workdir, "artifacts.npz")) as art:
    attacked = art["attacked_users"]
    for system, worst in results["robust"].items():
      # Every attack at eps 8 on this system's photos, the rejected-upload ('+gate') rows not.
      attacks = sorted(k.split("/", 1)[1] for k in results["ranking"]
                       if k.split("/")[0] == system and k.endswith(f"@{EPS}"))
      assert sorted(worst["attacks"]) == attacks, system
      assert len(attacks) >= 3 and worst["users"] == attacked_users, system
      for attack in attacks:
        single = results["ranking_attacked"][f"{system}/{attack}"]
        assert single["users"] == attacked_users
        for metric in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
          assert worst[metric] <= single[metric] + 1e-12, (
              f"{system}: worst case {metric} {worst[metric]:.4f} above {attack}'s "
              f"{single[metric]:.4f}")
      # The worst case from the per-user ranks: each user's largest rank over the attacks.
      ranks = np.max(np.stack([art[f"ranks/{system}/{a}"] for a in attacks]), axis=0)
      r = np.asarray(ranks, np.float64)[..., attacked]
      assert worst["HR@10"] == pytest.approx(float(np.mean(r < 10)), abs=1e-12), system
  # Not vacuous: some system's worst case is strictly below its strongest single attack
  # (the attacks knock out different users).
  assert any(results["robust"][s]["HR@10"] < min(
      results["ranking_attacked"][f"{s}/{a}"]["HR@10"] for a in results["robust"][s]["attacks"])
      for s in results["robust"])
