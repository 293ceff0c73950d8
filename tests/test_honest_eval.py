"""The evaluation a reviewer would accept: the defence's item split, the deployed threshold,
rand's order, the trainable detector encoder, and the seed summary."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training.train_state import TrainState

from conftest import tiny_config, tiny_models
from jaxvars import sharding
from jaxvars.attacks.spec import AttackSpec
from jaxvars.data import splits
from jaxvars.defenses.systems import make_rand_system
from jaxvars.evaluation.detection import detection_metrics
from jaxvars.evaluation.system_features import draw_keys
from jaxvars.experiment import item_split, with_detector_encoder
from jaxvars.report import seeds
from jaxvars.training.defense_step import make_defense_step, stage_optimizer


@pytest.mark.parametrize("fraction,hold", [(0.3, 40), (0.0, 40), (0.5, 10)])
def test_defence_split_is_disjoint_and_detection_items_are_unseen(tfds_dir, fraction, hold):
  config = tiny_config(tfds_dir, **{"defense.eval_fraction": fraction,
                                    "detector.holdout_items": hold})
  eval_items, holdout, pool, calibration = item_split(config, 240)
  assert not set(eval_items) & set(pool) and len(eval_items) + len(pool) == 240
  assert set(holdout) <= set(eval_items) and set(calibration) <= set(pool)
  assert len(eval_items) == max(round(fraction * 240), len(holdout)) and len(holdout) == hold
  again = item_split(config, 240)  # Seeded: the same split every time.
  assert all(np.array_equal(a, b) for a, b in zip(again, (eval_items, holdout, pool, calibration)))


def test_threshold_comes_from_calibration_items_only():
  rng = np.random.default_rng(0)
  cal = rng.random(500)
  a = detection_metrics(calibration_clean=cal, clean=rng.random(50), adversarial=rng.random(50) + 1,
                        fpr=0.05)
  b = detection_metrics(calibration_clean=cal, clean=rng.random(50) * 9, adversarial=rng.random(50),
                        fpr=0.05)
  assert a["threshold"] == b["threshold"] == pytest.approx(np.quantile(cal, 0.95))


@pytest.mark.parametrize("order", ["after", "before"])
def test_rand_order(order, tfds_dir):
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir, **{"denoiser.rand_order": order})
  x = jnp.asarray(images[:4], jnp.float32) / 255.0
  keys = draw_keys(jnp.arange(4), seed=0, draws=2)
  got = make_rand_system(config)(models, params, x, keys)
  assert got.shape == (2, 4) + x.shape[1:]
  for d in range(2):
    if order == "after":  # The paper: rand(D(x)).
      want = models.rand(models.denoise(params, x), keys[d])
    else:
      want = models.denoise(params, models.rand(x, keys[d]))
    np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got[0], got[1])  # Two draws, two transforms.


def test_rand_draws_do_not_depend_on_the_batch():
  a = draw_keys(jnp.array([3, 4, 5]), seed=1, draws=2)
  b = draw_keys(jnp.array([5, 9]), seed=1, draws=2)
  assert jnp.array_equal(jax.random.key_data(a[:, 2]), jax.random.key_data(b[:, 0]))


def test_detector_stage_trains_its_own_encoder(tfds_dir):
  models, params, consts, images, users, items = tiny_models()
  config = tiny_config(tfds_dir, **{"detector.train_encoder": True})
  params = jax.device_get(with_detector_encoder(params, consts["backbone"], config))
  models = dataclasses.replace(models, detector_encoder=True)
  mesh = sharding.make_mesh(1)
  batch_items = np.arange(8, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=20, num_items=40,
                                  positive_keys=splits.pair_keys(users, items, 40), per_role=2,
                                  rng=np.random.default_rng(1))
  step = make_defense_step(models, mesh, weights={"contrastive": 1.0}, mix=(0, 1, 0),
                           attack=AttackSpec(method="fgsm"), temperature=0.1)
  state = jax.device_put(TrainState.create(apply_fn=None, params=params,
                                           tx=stage_optimizer(("detector",), 1e-3)),
                         sharding.replicated(mesh))
  state, _ = step(state, sharding.shard_batch({"images": images[:8], "items": batch_items,
                                               "triplets": triplets}, mesh),
                  jax.device_put(consts, sharding.replicated(mesh)), jax.random.key(0))
  new = jax.device_get(state.params)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["detector"]["encoder"]),
                                                     jax.tree.leaves(params["detector"]["encoder"]))]
  assert any(moved)  # The encoder trained...
  for a, b in zip(jax.tree.leaves(consts["backbone"]["params"]),
                  jax.tree.leaves(params["detector"]["encoder"])):
    np.testing.assert_array_equal(a, b)  # ...from a copy: the recommender's backbone is intact.
  x = jnp.asarray(images[:2], jnp.float32) / 255.0
  frozen = dataclasses.replace(models, detector_encoder=False)
  assert not np.allclose(models.embed(new, consts, x), frozen.embed(new, consts, x))


def _run(seed, hr, diff=-0.05, effect="lower"):
  comparison = {"HR@10": {"diff": diff, "ci95": [diff - 0.02, diff + 0.02], "effect": effect}}
  return {"config": {"seed": seed},
          "ranking": {"vbpr/clean": {"HR@10": hr, "NDCG@10": hr / 2,
                                     "ci95": {"HR@10": [hr - 0.1, hr + 0.1]}}},
          "detection": {"pgd@8": {"accuracy": 0.9 + hr / 10, "roc_auc": 0.95}},
          "fidelity": {"clean": {"psnr": 20 + 10 * hr, "ssim": 0.9}},
          "comparisons": {"vbpr/pgd@8 - vbpr/clean": {"all": comparison, "unseen": comparison}}}


def test_seed_summary_mean_and_range():
  runs = [_run(0, 0.2), _run(1, 0.3, diff=-0.01, effect="none"), _run(2, 0.25)]
  s = seeds.summarize(runs)
  hr = s["ranking"]["vbpr/clean"]["HR@10"]
  assert hr["mean"] == pytest.approx(0.25) and hr["min"] == 0.2 and hr["max"] == 0.3
  assert hr["ci_width"] == pytest.approx(0.2)
  assert s["detection"]["pgd@8"]["accuracy"]["max"] == pytest.approx(0.93)
  assert s["fidelity"]["clean"]["psnr"]["mean"] == pytest.approx(22.5)
  diff = s["comparisons"]["vbpr/pgd@8 - vbpr/clean"]["all"]["HR@10"]
  assert diff["mean"] == pytest.approx(-0.11 / 3) and diff["min"] == -0.05
  assert diff["effects"] == {"higher": 0, "lower": 2, "none": 1}
  assert seeds.verdict(diff["effects"]) == "lower in 2/3 seeds (no measurable change in 1)"
  assert seeds.verdict({"higher": 3, "lower": 0, "none": 0}) == "higher in 3/3 seeds"
  text = "\n".join(seeds.markdown(s, runs[0]))
  assert ("| VBPR pgd@8 - VBPR clean | -0.0367 [-0.0500, -0.0100] | lower in 2/3 seeds "
          "(no measurable change in 1) |") in text
  assert "| clean | 22.5000 [22.0000, 23.0000] | 0.9000 [0.9000, 0.9000] |" in text
  assert "| clean | VBPR | 0.2500 [0.2000, 0.3000] | 0.1250 [0.1000, 0.1500] | 0.2000 |" in text
