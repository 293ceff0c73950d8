"""Checkpoints restore to identical scores; evaluation mode reproduces training's metrics."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, TINY_RUN_ROWS, cli_env, tiny_config
from flax.training.train_state import TrainState

from jaxvars import checkpointing, run, sharding
from jaxvars.errors import CheckpointError
from jaxvars.experiment import build, make_consts
from jaxvars.training import defense, recommender as rec_training
from jaxvars.evaluation import detection as det
from jaxvars.recommenders.vbpr import VBPR


def test_restore_gives_identical_scores(tmp_path):
  mesh = sharding.make_mesh(1)
  model = VBPR(num_users=9, num_items=13, feature_dim=6, factors=4, form="he", init_scale=0.3)
  init = lambda key: TrainState.create(
      apply_fn=model.apply, tx=optax.adam(1e-3),
      params=model.init(key, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                        jnp.zeros((1, 6)))["params"])
  state = jax.device_put(init(jax.random.key(0)), sharding.replicated(mesh))
  mgr = checkpointing.manager(str(tmp_path))
  checkpointing.save(mgr, 3, {"vbpr": state})
  fresh = jax.device_put(init(jax.random.key(1)), sharding.replicated(mesh))  # Other values.
  step, tree = checkpointing.restore_latest(mgr, {"vbpr": fresh})
  assert step == 3
  u, i = jnp.arange(9) % 9, jnp.arange(9) % 13
  f = jax.random.normal(jax.random.key(2), (9, 6))
  np.testing.assert_array_equal(model.apply({"params": tree["vbpr"].params}, u, i, f),
                                model.apply({"params": state.params}, u, i, f))


def test_restore_without_checkpoint_is_an_error(tmp_path):
  mgr = checkpointing.manager(str(tmp_path))
  with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path}; run with --mode=train"):
    checkpointing.restore_latest(mgr, {"a": jnp.zeros(2)})


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_trained_run_results_artifacts_and_resume(tiny_run):
  """The shared tiny run (conftest.tiny_run): every table of results.json, the artifacts,
  the golden numbers, and a second training run in the same workdir that restores every
  stage. (--mode=evaluate reproducing it is tested in test_report.py.)"""
  config, workdir, trained = tiny_run
  assert set(trained["ranking"]) == TINY_RUN_ROWS
  # No change moved a number by accident: every ranking, detection and worst-case row equals
  # tests/golden/tiny_run.json (same preset, same seeds), every metric, to a relative 1e-6.
  # A change meant to move numbers rewrites the file and says why in its note.
  with open(os.path.join(REPO, "tests", "golden", "tiny_run.json")) as f:
    golden = json.load(f)
  for section in ("ranking", "detection", "robust"):
    assert set(trained[section]) == set(golden[section]), section
    for key, want in golden[section].items():
      numbers = {m: v for m, v in want.items() if not isinstance(v, list)}
      got = {m: trained[section][key][m] for m in numbers}
      assert got == pytest.approx(numbers, rel=1e-6, abs=1e-9), f"{section}/{key}"
      for m in set(want) - set(numbers):  # The worst case's list of attacks.
        assert trained[section][key][m] == want[m], f"{section}/{key}/{m}"
  metrics = {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
  row = trained["ranking"]["vbpr/clean"]
  assert set(row) == metrics | {"ci95", "users"} and set(row["ci95"]) == metrics
  assert all(lo <= row[m] <= hi for m, (lo, hi) in row["ci95"].items())
  assert set(trained["ranking_unseen"]) == set(trained["ranking"]) == set(trained["ranking_seen"])
  assert trained["users"]["unseen"] + trained["users"]["seen"] == trained["users"]["all"] == 60
  assert len(trained["ranking"]["defended_rand/clean"]["draws"]["HR@10"]) == 2  # eval.rand_draws
  assert set(trained["detection"]) == {"fgsm@4", "pgd@4", "fgsm@8", "pgd@8"}
  assert {"accuracy", "roc_auc", "oracle_tpr@fpr=0.05", "threshold", "ci95"} <= set(
      trained["detection"]["fgsm@8"])
  for cond, attack in trained["attack"].items():  # 'pgd-demote-wb@64@defended': eps 64.
    eps = float(cond.split("@")[1])
    assert attack["linf_255"] <= eps + 1e-4 and attack["l2"] > 0 and attack["time_s"] > 0
  assert set(trained["training"]["stages"]) == {"denoiser_fgsm", "denoiser_mix", "detector",
                                                "joint"}
  for name in trained["training"]["stages"]:
    assert os.path.isdir(os.path.join(workdir, "checkpoints", name))
  # artifacts.npz holds the raw detector scores behind the detection table, and figures' inputs.
  with np.load(os.path.join(workdir, "artifacts.npz")) as art:
    again = det.detection_metrics(calibration_clean=art["detector/calibration_clean"],
                                 clean=art["detector/clean"], adversarial=art["detector/pgd@8"],
                                 fpr=config.detector.fpr)
    assert again["accuracy"] == trained["detection"]["pgd@8"]["accuracy"]
    assert again["roc_auc"] == trained["detection"]["pgd@8"]["roc_auc"]
    n = trained["data"]["defense_holdout_items"]
    assert art["detector/clean"].shape == (n,) and art["holdout_items"].shape == (n,)
    for cond in ("clean", "fgsm@8", "pgd@8"):
      assert art[f"images/{cond}"].dtype == np.uint8 and art[f"images/{cond}"].shape[0] == 8
      assert art[f"images/{cond}/denoised"].shape == art[f"images/{cond}"].shape
      assert art[f"embeddings/{cond}"].shape == (min(n, 200), config.detector.dim)
    assert art["embeddings/clean/denoised"].shape == art["embeddings/clean"].shape
    # Every row of every ranking table, recomputed from the per-user ranks with the plain
    # formulas (not jaxvars' metric code).
    _check_tables_from_ranks(trained, art, config)
    ranks = {k[len("ranks/"):]: art[k] for k in art.files if k.startswith("ranks/")}
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["ranking"] == trained["ranking"]
  assert on_disk["data"]["users"] == trained["data"]["users"] > 0
  assert {"features_s", "recommender_train_s", "ranking_s", "detection_s", "total_s"} <= set(
      on_disk["timing"])
  # Training again in the same workdir restores every finished stage (the training half of
  # run.train_and_evaluate; --mode=evaluate reproducing the metrics is tested in
  # test_report.py): no step re-runs, and every stage's history and time come from its record.
  exp = build(config, workdir)
  consts = make_consts(exp)
  rec_state, rec_history, n_steps, rec_seconds = rec_training.train_recommender(
      exp, consts, workdir)
  assert n_steps == 0 and rec_seconds == pytest.approx(trained["timing"]["recommender_train_s"])
  params, stage_history, stage_seconds = defense.train_defense(
      exp, consts, dict(exp.params, recommender=rec_state.params), workdir)
  again = run.training_section(config, rec_history, rec_state.step, stage_history)
  assert again == trained["training"]
  for name, seconds in stage_seconds.items():
    assert seconds == pytest.approx(trained["timing"][f"stage_{name}_s"]), name
  # The per-user ranks behind the clean rows, recomputed from the restored parameters with
  # numpy: VBPR's score p_u . (q_i + E f_i) (float64), most-popular from the training counts.
  for key, want in _independent_ranks(exp, consts, rec_state.params).items():
    lo, hi = want
    assert np.all((lo <= ranks[key]) & (ranks[key] <= hi)), key
    assert np.mean(lo == hi) > 0.9, key  # Near-ties (float32 vs float64) are rare.
  restored = defense.restore_stages(exp, dict(exp.params, recommender=rec_state.params), workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The conditions of the tiny run's transfer sweep (every user scored); the other conditions
# (the item-subset attacks: the extra objectives, white-box and sanity rows) are scored on
# the users whose held-out item they perturbed.
def _sweep_conditions(config):
  return ({"clean", "no_visual"}
          | {f"{m}@{e:g}" for m in ("fgsm", "pgd") for e in config.attack.eval_eps})


def _plain_metrics(ranks: np.ndarray, users: np.ndarray) -> dict:
  """HR@N = share of (draw, user) pairs with rank < N; NDCG@N = mean of 1/log2(rank + 2)
  over those (0 otherwise); ranks [U] or [K, U] (every draw weighs the same)."""
  r = np.asarray(ranks, np.float64)[..., users]
  out = {}
  for n in (5, 10, 20):
    out[f"HR@{n}"] = float(np.mean(r < n))
    out[f"NDCG@{n}"] = float(np.mean(np.where(r < n, 1.0 / np.log2(r + 2.0), 0.0)))
  return out


def _check_tables_from_ranks(trained, art, config):
  """results.json's ranking tables against the artifacts' per-user ranks."""
  unseen, attacked = art["unseen_users"], art["attacked_users"]
  assert unseen.dtype == bool and attacked.dtype == bool and unseen.shape == attacked.shape
  assert attacked.sum() == trained["users"]["attacked"] < len(attacked)
  everyone = np.ones_like(attacked)
  sweep = _sweep_conditions(config)
  for key in trained["ranking"]:
    r = art[f"ranks/{key}"]
    assert r.dtype == np.int16 and r.shape[-1] == len(unseen), key
    cond = key.split("/", 1)[1]
    scored = everyone if cond in sweep else attacked
    for section, users in (("ranking", scored), ("ranking_unseen", scored & unseen),
                           ("ranking_seen", scored & ~unseen), ("ranking_attacked", attacked)):
      row = trained[section][key]
      assert row["users"] == users.sum(), (section, key)
      want = _plain_metrics(r, users)
      assert {m: row[m] for m in want} == pytest.approx(want, rel=1e-9, abs=1e-12), (section, key)


def _independent_ranks(exp, consts, rec_params) -> dict:
  """{row: (lowest, highest) rank [U]} of mostpop/clean, vbpr/clean and vbpr/no_visual from
  the data and the restored parameters, in numpy: ties count against the held-out item;
  a negative whose float64 score lies within 1e-5 of the held-out item's, relative to the
  user's largest score, may go either way (the run scores in float32). At this seed the
  closest call is 5e-4 (vbpr/clean) and 1.3e-5 (vbpr/no_visual): every rank is exact."""
  assert exp.config.recommender.form == "tang"
  d = exp.data
  cands = np.concatenate([d.test_items[:, None], d.eval_negatives], axis=1)
  p = {k: np.asarray(v, np.float64) for k, v in rec_params.items()}
  feats = np.asarray(consts["features"], np.float64)

  def bounds(scores, rel):
    pos, neg = scores[:, :1], scores[:, 1:]
    tol = rel * np.abs(scores).max(axis=1, keepdims=True)
    return np.sum(neg >= pos + tol, axis=1), np.sum(neg >= pos - tol, axis=1)

  def vbpr(f):  # Tang et al.'s form, the tiny preset's: x_ui = p_u . (q_i + E f_i).
    return np.einsum("uk,uck->uc", p["user_factors"],
                     p["item_factors"][cands] + f[cands] @ p["visual_projection"])

  popularity = np.bincount(d.train_items, minlength=d.num_items).astype(np.float64)
  return {"mostpop/clean": bounds(popularity[cands], 0.0),
          "vbpr/clean": bounds(vbpr(feats), 1e-5),
          "vbpr/no_visual": bounds(vbpr(np.zeros_like(feats)), 1e-5)}


def test_vbpr_preset_evaluates_clean_vbpr_only(tfds_dir, tmp_path):
  from configs import joint
  config = joint.get_config("tiny,vbpr")
  config.data.tfds_dir = str(tfds_dir)
  results = run.train_and_evaluate(config, str(tmp_path))
  assert set(results["ranking"]) == {"mostpop/clean", "vbpr/clean", "vbpr/no_visual"}
  assert results["detection"] == {} and results["attack"] == {}
  assert results["ranking"]["vbpr/clean"]["HR@10"] > results["ranking"]["mostpop/clean"]["HR@10"]


def test_evaluate_without_training_is_an_error(tfds_dir, tmp_path):
  with pytest.raises(CheckpointError, match="run with --mode=train first"):
    run.evaluate(tiny_config(tfds_dir), str(tmp_path))


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path):
  env = cli_env()
  base = [sys.executable, "-m", "jaxvars.main", "--config=configs/joint.py:tiny",
          f"--workdir={tmp_path}", f"--config.data.tfds_dir={tmp_path}/tfds",
          # A small run: the CLI's plumbing is what this tests (the rest is tested in-process).
          "--config.systems.evaluate=('undefended', 'defended')", "--config.attack.eval_eps=(8,)",
          "--config.attack.methods=('fgsm',)", "--config.stages.denoiser_mix.epochs=0",
          "--config.stages.joint.epochs=0", "--config.eval.report=False",
          "--config.attack.adaptive.eps=()", "--config.targeted.num_targets=0"]
  r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "vbpr/clean" in r.stdout and "mostpop/clean" in r.stdout
  first = json.load(open(tmp_path / "results.json"))["ranking"]
  r = subprocess.run(base + ["--mode=evaluate"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restored checkpoints reproduce the training run's metrics exactly" in r.stderr
  assert json.load(open(tmp_path / "results.json"))["ranking"] == first
