"""Several recommenders in one run (jaxvars/families.py, paper Tables 2-3), on the shared tiny
run (conftest.tiny_run: config.recommenders = VBPR, AMR, BPR-MF, DVBPR; DVBPR's own
checks are in tests/test_dvbpr.py):

* every row of the table, and the defence recommender's rows equal to the main ranking's;
* each other recommender's attacks are crafted against it: its cached FGSM photos equal a
  fresh FGSM crafted on its own restored parameters, and differ from those crafted on VBPR;
* AMR's first stage is the run's VBPR, bit for bit (same seed, triplets and steps);
* the worst case is not above any attack's row; the paired differences equal the
  difference of the two rows' means (same users);
* the report's table carries our rows and the paper's Amazon Men / Fashion numbers;
* config errors and the stage records of the other recommenders;
* the feature-space attack AMR trains on (Tang et al.): eps 0 gives the clean ranks, the
  perturbation has norm eps per trained item and raises the BPR loss more than random
  directions of the same norms, and the run's rows reproduce.
"""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from jaxvars import configuration, families, report, run, workdir as wd
from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.errors import ConfigError
from jaxvars.experiment import build, make_consts
from jaxvars.evaluate import attack_specs
from jaxvars.evaluation import feature_attack
from jaxvars.training import recommender as rec_training

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]

SYSTEMS = ("undefended", "defended", "defended_rand")


def test_rows_of_every_recommender(tiny_run):
  config, _, results = tiny_run
  sec = results["recommenders"]
  assert sec["names"] == ["vbpr", "amr", "bprmf", "dvbpr"]
  assert sec["defense_recommender"] == "vbpr"
  conds = ["clean", "fgsm@4", "pgd@4", "fgsm@8", "pgd@8"]
  expected = {f"{r}/{s}/{c}" for r in ("vbpr", "amr", "dvbpr") for s in SYSTEMS for c in conds}
  expected.add("bprmf/undefended/clean")  # No photo moves BPR-MF: clean, undefended only.
  assert set(sec["rows"]) == expected
  for s in SYSTEMS:
    for c in conds:
      main_row = "vbpr" if s == "undefended" else s
      assert sec["rows"][f"vbpr/{s}/{c}"] == results["ranking"][f"{main_row}/{c}"]
  # The AMR run's own results.json holds the same rows, under its own row names.
  with open(wd.results_path(families.recommender_dir(tiny_run[1], "amr"))) as f:
    amr = json.load(f)
  assert sec["rows"]["amr/undefended/pgd@8"] == amr["ranking"]["amr/pgd@8"]
  assert sec["rows"]["amr/defended/fgsm@4"] == amr["ranking"]["defended/fgsm@4"]
  training = sec["runs"]["amr"]["training"]
  assert [s["name"] for s in training["stages"]] == ["bpr", "adversarial"]
  assert training["epochs"] == config.recommender.epochs + config.recommender.adv_epochs
  assert len(training["history"]) == training["epochs"]


def test_attacks_are_crafted_against_each_recommender(tiny_run):
  config, workdir, _ = tiny_run
  sub = families.recommender_dir(workdir, "amr")
  exp = build(config, workdir)
  consts = make_consts(exp)
  ex = families.experiment_for(exp, "amr", workdir)
  state, _, _ = rec_training.restore(ex, sub)
  params = dict(exp.params, recommender=state.params)
  spec = next(s for s in attack_specs(ex.config) if s.condition == "fgsm@8")
  fresh, _ = cached_attack_catalogue(spec, cache_dir=None, models=ex.models, params=params,
                                     consts=consts, data=exp.data, mesh=exp.mesh,
                                     batch_size=int(config.attack.batch_size), config=ex.config)
  cached = np.load(os.path.join(wd.attacks_dir(sub), "fgsm@8.npy"))
  on_vbpr = np.load(os.path.join(wd.attacks_dir(workdir), "fgsm@8.npy"))
  np.testing.assert_array_equal(np.asarray(fresh), cached)
  # Another recommender's gradient, other photos. AMR is VBPR fine-tuned for a few epochs,
  # so most gradient signs agree (tiny: 2.6% of the uint8 values differ); equal arrays would
  # mean the attack was crafted against VBPR.
  assert np.mean(cached != on_vbpr) > 0.01
  # Both stay in the same eps-ball around the clean photos (8/255, uint8).
  clean = np.asarray(exp.data.images, np.int16)
  assert np.abs(cached.astype(np.int16) - clean).max() <= 8


def test_amr_starts_from_the_runs_vbpr(tiny_run):
  """AMR's 'bpr' stage is VBPR's training: the checkpoint at its end equals the run's VBPR."""
  config, workdir, _ = tiny_run
  import orbax.checkpoint as ocp
  from jaxvars import checkpointing
  exp = build(config, workdir)
  vbpr, _, _ = rec_training.restore(exp, workdir)
  ex = families.experiment_for(exp, "amr", workdir)
  mgr = checkpointing.manager(wd.checkpoint_dir(families.recommender_dir(workdir, "amr"),
                                                rec_training.CHECKPOINT_DIR))
  steps = sorted(mgr.all_steps())
  bpr_end = int(vbpr.step)
  assert bpr_end in steps, (bpr_end, steps)  # Saved at the end of each stage.
  like = {"recommender": rec_training.initial_state(ex), "backbone": exp.backbone_vars}
  tree = mgr.restore(bpr_end, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, like)))
  mgr.close()
  for a, b in zip(jax.tree.leaves(tree["recommender"].params), jax.tree.leaves(vbpr.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_worst_case_and_comparisons(tiny_run):
  config, _, results = tiny_run
  sec = results["recommenders"]
  for rec in ("vbpr", "amr", "dvbpr"):
    for s in SYSTEMS:
      worst = sec["robust"][f"{rec}/{s}"]
      assert sorted(worst["attacks"]) == ["fgsm@8", "pgd@8"]  # The report's eps.
      for c in worst["attacks"]:
        assert worst["HR@10"] <= sec["rows"][f"{rec}/{s}/{c}"]["HR@10"] + 1e-12
  comps = sec["comparisons"]
  for key in ("amr/undefended/fgsm@8 - vbpr/undefended/fgsm@8",
              "amr/undefended/fgsm@8 - vbpr/defended/fgsm@8",
              "amr/defended/pgd@8 - amr/undefended/pgd@8",
              "vbpr/defended_rand/clean - vbpr/undefended/clean",
              "bprmf/undefended/clean - vbpr/undefended/clean"):
    a, b = key.split(" - ")
    d = comps[key]["HR@10"]
    assert d["diff"] == pytest.approx(sec["rows"][a]["HR@10"] - sec["rows"][b]["HR@10"], abs=1e-9)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]


def test_report_table(tiny_run):
  _, workdir, results = tiny_run
  with open(report.write_report(workdir)) as f:
    text = f.read()
  part = text[text.index("### Recommender families"):]
  part = part[:part.index("\n#", 1)]  # This section only: later tables reuse the row names.
  table = [line for line in part.splitlines() if line.startswith("| ")]
  rows = {(r[0], r[1]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                    for line in table[1:])}
  amr = rows[("fgsm@8", "AMR")]
  assert amr[2].startswith(f"{results['recommenders']['rows']['amr/undefended/fgsm@8']['HR@10']:.4f}")
  assert amr[4] == "0.0262 / 0.0105" and amr[5] == "0.0110 / 0.0040"  # Tables 2 and 3.
  assert rows[("pgd@8", "OURS-rand")][4] == "0.2719 / 0.1257"
  assert ("worst case", "OURS (AMR)") in rows and ("clean", "BPR-MF") in rows
  # DVBPR's rows carry the paper's DVBPR block (Tables 2 and 3, clean and PGD).
  assert rows[("clean", "DVBPR")][4:6] == ["0.4740 / 0.1435", "0.5202 / 0.3053"]
  assert rows[("pgd@8", "OURS-rand (DVBPR)")][4] == "0.3024 / 0.1398"
  assert re.search(r"\* fgsm@8: AMR - VBPR: [+-]\d\.\d{4} \[", part)
  assert re.search(r"\* AMR - VBPR under the attack: [+-]\d\.\d{4} \[", part)


def test_config_errors_and_records(tiny_run, tfds_dir):
  config, workdir, _ = tiny_run
  bad = tiny_config(tfds_dir, recommenders=("vbpr", "nope"))
  with pytest.raises(ConfigError, match=r"config.recommenders: 'nope' is not a registered"):
    configuration.validate(bad)
  as_string = tiny_config(tfds_dir)  # A config file that wrote a string, not a tuple.
  del as_string["recommenders"]
  as_string.recommenders = "amr"
  with pytest.raises(ConfigError, match=r"config.recommenders='amr'"):
    configuration.validate(as_string)
  # AMR's own field shapes AMR's checkpoint, not the main VBPR's.
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.recommender.adv_eps = float(config.recommender.adv_eps) * 2
  inputs, _ = run.input_fingerprints(changed, workdir)
  with pytest.raises(ConfigError, match=r"recommenders/amr/recommender: .*adv_eps"):
    run.check_stages(changed, workdir, inputs, resume="error", warn=False)
  assert run.check_stages(config, workdir, inputs, resume="error", warn=False) == []


def test_feature_attack(tiny_run):
  config, workdir, results = tiny_run
  fa = results["recommenders"]["feature_attack"]
  assert sorted(fa["rows"]) == ["amr", "dvbpr", "vbpr"]  # BPR-MF has no feature to perturb.
  assert fa["eps"] == float(config.recommender.adv_eps)
  exp = build(config, workdir)
  consts = make_consts(exp)
  state, _, _ = rec_training.restore(exp, workdir)
  rec, params, feats, data = exp.models.recommender, state.params, consts["features"], exp.data
  key = jax.random.fold_in(jax.random.key(int(config.seed)), families.FEATURE_ATTACK_SALT)
  with open(wd.artifacts_path(workdir), "rb") as f:
    clean = wd.ranks_of(dict(np.load(f)))["vbpr/clean"]
  at0 = feature_attack.ranks(rec, params, feats, data, eps=0.0, key=key, batch_users=32)
  np.testing.assert_array_equal(at0, clean)
  at = feature_attack.ranks(rec, params, feats, data, eps=float(config.recommender.adv_eps),
                            key=key, batch_users=32)
  assert np.mean(at < 10) == pytest.approx(fa["rows"]["vbpr"]["HR@10"])
  # The perturbation: norm eps on every item of a triplet (a training positive or a drawn
  # negative), zero elsewhere ...
  eps = 2.0
  delta = feature_attack.perturbation(rec, params, feats, data.train_users, data.train_items,
                                      eps=eps, key=key)
  norms = np.linalg.norm(delta, axis=1)
  neg = np.asarray(jax.random.randint(key, (len(data.train_items),), 0, len(norms)))
  touched = np.zeros(len(norms), bool)
  touched[data.train_items] = touched[neg] = True
  assert touched.mean() < 1  # Some item in no triplet (tiny: 240 items).
  np.testing.assert_allclose(norms[touched], eps, rtol=1e-4)
  assert np.all(norms[~touched] == 0)
  # ... and it ascends the training BPR loss (the same negatives) faster than random
  # directions of the same row norms.
  u, i = np.asarray(data.train_users), np.asarray(data.train_items)

  def loss(table):
    x = np.asarray(rec.difference(params, u, i, neg, table[i], table[neg]), np.float64)
    return float(np.sum(np.logaddexp(0.0, -x)))

  base = loss(np.asarray(feats))
  rng = np.random.default_rng(0)
  noise = rng.normal(size=delta.shape)
  noise *= (norms / np.linalg.norm(noise, axis=1))[:, None]
  assert loss(np.asarray(feats) + delta) > base
  assert loss(np.asarray(feats) + delta) - base > 3 * abs(loss(np.asarray(feats) + noise) - base)
  with pytest.raises(ValueError, match="eps=-1"):
    feature_attack.perturbation(rec, params, feats, u, i, eps=-1.0, key=key)
