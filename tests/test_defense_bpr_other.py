"""Both items of a triplet through the defence (issue 35, item 6).

* ``config.defense.bpr_other``: the joint loss's BPR term scores the other item j of each
  triplet with f(D(x_j)) ('defended', gradient through x_j's photo too: the paper's eq. 12;
  'defended_frozen' the same value without it) instead of its clean feature f(x_j)
  ('clean', the behaviour before). Checked against f(D(x_j)) computed another way (the
  models' own ``features`` of ``denoise``), values and gradients.
* ``config.attack.whitebox_table``: a white-box attack's objective reads the attacked
  system's deployed table (f(D(x)) for OURS), the one the evaluation ranks with.
* A changed option is a recorded difference (the defence stage retrains) and another attack
  cache key (a clean-table attack is never served for a deployed-table request).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training.train_state import TrainState

from conftest import tiny_config, tiny_models
from test_objectives import _data

from jaxvars import sharding
from jaxvars.attacks import catalogue
from jaxvars.attacks.objectives.bpr import item_bpr_loss
from jaxvars.attacks.spec import AttackSpec
from jaxvars.attacks.whitebox import attack_loss, uses_deployed_table
from jaxvars.configuration import validate
from jaxvars.data import splits
from jaxvars.errors import ConfigError
from jaxvars.evaluation.loop import EvalContext, deployed_table
from jaxvars.evaluation.system_features import system_features
from jaxvars.experiment import build, make_consts
from jaxvars.overrides import apply_overrides
from jaxvars.pixels import to_float
from jaxvars.training import defense, records
from jaxvars.training.defense import stage_names
from jaxvars.training.defense_step import (OTHER_IMAGES, defense_objective, make_defense_step,
                                           needs_other_images, other_items, stage_optimizer)

NUM_USERS, NUM_ITEMS, B, T = 20, 40, 8, 2


@pytest.fixture(scope="module")
def setup():
  models, params, consts, images, users, items = tiny_models(NUM_USERS, NUM_ITEMS)
  # D starts as the identity: perturb it so that f(D(x)) is far from f(x).
  params = dict(params, denoiser=jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), params["denoiser"]))
  batch_items = np.arange(B, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=NUM_USERS, num_items=NUM_ITEMS,
                                  positive_keys=splits.pair_keys(users, items, NUM_ITEMS),
                                  per_role=T, rng=np.random.default_rng(1))
  batch = {"images": images[:B], "items": batch_items, "triplets": triplets,
           OTHER_IMAGES: images[other_items(triplets)]}
  return models, params, consts, images, users, items, batch


def _bpr(params, consts, batch, *, models, bpr_other):
  x = to_float(batch["images"])
  return defense_objective(params, consts, batch, x, jnp.float32(0.0), models=models,
                           weights={"bpr": 1.0}, temperature=0.1, bpr_other=bpr_other)[1]["bpr"]


def _reference(params, consts, batch, images, *, models, frozen=False):
  """The BPR term with both images of every triplet through D, written another way: the
  features of the whole catalogue through ``models.denoise`` as the other items' table."""
  x = to_float(batch["images"])
  own = models.features(consts, models.denoise(params, x))
  other_params = jax.lax.stop_gradient(params) if frozen else params
  table = models.features(consts, models.denoise(other_params, to_float(images)))
  return jnp.mean(item_bpr_loss(own, items=batch["items"], triplets=batch["triplets"],
                                score_fn=models.score_fn(params["recommender"]),
                                other_features=table))


def test_other_items_are_the_triplets_other_item():
  t = {"pos_negs": np.array([[1, 2], [3, 4]]), "neg_pos": np.array([[5, 6], [7, 8]])}
  np.testing.assert_array_equal(other_items(t), [[1, 2, 5, 6], [3, 4, 7, 8]])
  assert needs_other_images({"bpr": 0.1}, "defended")
  assert needs_other_images({"bpr": 0.1}, "defended_frozen")
  assert not needs_other_images({"bpr": 0.1}, "clean")
  assert not needs_other_images({"bpr": 0.0, "content": 1.0}, "defended")
  assert not needs_other_images({"content": 1.0}, "defended")


def test_defended_bpr_term_scores_the_other_item_through_the_denoiser(setup):
  models, params, consts, images, _, _, batch = setup
  got = {o: float(_bpr(params, consts, batch, models=models, bpr_other=o))
         for o in ("clean", "defended", "defended_frozen")}
  want = float(_reference(params, consts, batch, images, models=models))
  assert got["defended"] == pytest.approx(want, rel=1e-5)
  assert got["defended_frozen"] == pytest.approx(want, rel=1e-5)
  # 'clean' (the old behaviour): the other item's clean feature, the table consts['features'].
  x = to_float(batch["images"])
  clean = jnp.mean(item_bpr_loss(models.features(consts, models.denoise(params, x)),
                                 items=batch["items"], triplets=batch["triplets"],
                                 score_fn=models.score_fn(params["recommender"]),
                                 other_features=consts["features"]))
  assert got["clean"] == pytest.approx(float(clean), rel=1e-5)
  assert abs(got["clean"] - got["defended"]) > 1e-3 * abs(got["defended"])


def test_defended_bpr_gradient_reaches_the_denoiser_through_both_images(setup):
  models, params, consts, images, _, _, batch = setup
  grad = lambda f, **kw: jax.grad(f)(params, consts, batch, models=models, **kw)["denoiser"]
  both = grad(_bpr, bpr_other="defended")
  frozen = grad(_bpr, bpr_other="defended_frozen")
  clean = grad(_bpr, bpr_other="clean")
  want_both = grad(lambda p, c, b, models: _reference(p, c, b, images, models=models))
  want_frozen = grad(lambda p, c, b, models: _reference(p, c, b, images, models=models,
                                                        frozen=True))
  leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]
  for a, b in zip(leaves(both), leaves(want_both)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(leaves(frozen), leaves(want_frozen)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  diff = lambda u, v: max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(u), leaves(v)))
  assert diff(both, frozen) > 1e-6  # The other item's path carries gradient...
  assert diff(frozen, clean) > 1e-6  # ...and its value differs from the clean table's.


def test_defense_step_with_defended_other_items_runs_and_needs_their_photos(setup):
  models, params, consts, _, _, _, batch = setup
  mesh = sharding.make_mesh(1)
  attack = AttackSpec(method="pgd", eps=8.0, steps=2, alpha_ratio=0.0, alpha=2.0)
  tx = stage_optimizer(("denoiser",), 1e-3)
  c = jax.device_put(consts, sharding.replicated(mesh))
  state = lambda: jax.device_put(TrainState.create(
      apply_fn=None, params=jax.device_get(params), tx=tx), sharding.replicated(mesh))
  weights = {"content": 1.0, "bpr": 0.1}
  step = make_defense_step(models, mesh, weights=weights, mix=(1, 0, 0), attack=attack,
                           temperature=0.1, bpr_other="defended")
  _, m = step(state(), sharding.shard_batch(batch, mesh), c, jax.random.key(0))
  want = _bpr(params, consts, dict(batch), models=models, bpr_other="defended")
  assert float(m["bpr"]) == pytest.approx(float(want), rel=1e-5)  # A clean step: x_adv = x.
  # The other items' photos are sharded with the batch: 8 devices give the same step.
  mesh8 = sharding.make_mesh(8)
  step8 = make_defense_step(models, mesh8, weights=weights, mix=(1, 0, 0), attack=attack,
                            temperature=0.1, bpr_other="defended")
  state8 = jax.device_put(TrainState.create(apply_fn=None, params=jax.device_get(params), tx=tx),
                          sharding.replicated(mesh8))
  _, m8 = step8(state8, sharding.shard_batch(batch, mesh8),
                jax.device_put(consts, sharding.replicated(mesh8)), jax.random.key(0))
  assert float(m8["bpr"]) == pytest.approx(float(m["bpr"]), rel=1e-4)
  without = {k: v for k, v in batch.items() if k != OTHER_IMAGES}
  with pytest.raises(KeyError, match=OTHER_IMAGES):
    step(state(), sharding.shard_batch(without, mesh), c, jax.random.key(0))
  with pytest.raises(ValueError, match="bpr_other"):
    make_defense_step(models, mesh, weights=weights, mix=(1, 0, 0), attack=attack,
                      temperature=0.1, bpr_other="deployed")


# ---- The white-box attack's table ------------------------------------------------------------

def _eval_ctx(setup, config):
  models, params, consts, images, users, items, _ = setup
  return EvalContext(models=models, params=params, consts=consts,
                     data=_data(images, users, items), mesh=sharding.make_mesh(1), config=config,
                     systems=("undefended", "defended"), eval_items=np.arange(NUM_ITEMS),
                     holdout=np.arange(4), calibration=np.arange(4))


def test_whitebox_objective_table_is_the_attacked_systems_deployed_table(setup, tfds_dir):
  models, params, consts, images, users, items, batch = setup
  config = tiny_config(tfds_dir)
  assert config.attack.whitebox_table == "clean"
  spec = AttackSpec(method="pgd", objective="bpr", eps=8.0, through="defended")
  assert deployed_table(_eval_ctx(setup, config), spec, {}) is None  # The option off.
  config.attack.whitebox_table = "deployed"
  validate(config)
  ctx = _eval_ctx(setup, config)
  assert uses_deployed_table(spec, config)
  assert deployed_table(ctx, dataclasses.replace(spec, through=None), {}) is None  # Transfer.
  table = deployed_table(ctx, spec, {})
  # The defended system's table: what the evaluation ranks OURS with on clean photos...
  mesh = sharding.make_mesh(1)
  ours = system_features("defended", models=models, params=params, consts=consts, images=images,
                         mesh=mesh, batch_size=ctx.batch_size, config=config, seed=0)
  np.testing.assert_array_equal(table, ours)
  # ...which is f(D(x)) of every item, computed directly.
  direct = models.features(consts, models.denoise(params, to_float(images)))
  np.testing.assert_allclose(table, direct, rtol=1e-4, atol=1e-5)
  # The clean condition's features are reused, not computed again.
  assert deployed_table(ctx, spec, {"defended": ours * 0 + 1})[0, 0] == 1

  # The attack's loss reads it: eq. 3 with the other items' deployed features.
  x = to_float(batch["images"])  # 8-bit photos: the BPDA quantisation is the identity.
  loss, stochastic = attack_loss(spec, models=models, params=params, consts=consts,
                                 config=config, items=batch["items"], inputs=batch["triplets"],
                                 table=table)
  assert not stochastic
  own = models.features(consts, models.denoise(params, x))
  score = models.score_fn(params["recommender"])
  want = item_bpr_loss(own, items=batch["items"], triplets=batch["triplets"], score_fn=score,
                       other_features=jnp.asarray(direct))
  np.testing.assert_allclose(loss(x), want, rtol=1e-4)
  old, _ = attack_loss(spec, models=models, params=params, consts=consts, config=config,
                       items=batch["items"], inputs=batch["triplets"])
  want_old = item_bpr_loss(own, items=batch["items"], triplets=batch["triplets"], score_fn=score,
                           other_features=consts["features"])
  np.testing.assert_allclose(old(x), want_old, rtol=1e-4)
  assert not np.allclose(old(x), loss(x), rtol=1e-3)


def test_randomised_systems_table_draws_pair_with_the_eot_draws(setup, tfds_dir):
  models, params, consts, images, users, items, batch = setup
  config = tiny_config(tfds_dir)
  spec = AttackSpec(method="pgd", objective="bpr", eps=8.0, through="defended_rand", eot=2)
  x = to_float(batch["images"])
  kw = dict(models=models, params=params, consts=consts, config=config, items=batch["items"],
            inputs=batch["triplets"])
  a = np.asarray(consts["features"])
  b = a + 0.5
  run = lambda table: np.asarray(attack_loss(spec, table=table, **kw)[0](x, jax.random.key(0)))
  np.testing.assert_allclose(run(np.stack([a, a])), run(a), rtol=1e-5)
  # EOT draw d reads table draw d mod K: the mean of the two draws' losses.
  both = run(np.stack([a, b]))
  assert not np.allclose(both, run(a), rtol=1e-3)
  assert not np.allclose(both, run(b), rtol=1e-3)


def test_attack_cache_keys_tell_the_tables_apart(setup, tmp_path):
  models, params, consts, images, users, items, _ = setup
  data = _data(images, users, items)
  mesh = sharding.make_mesh(1)
  spec = AttackSpec(method="fgsm", objective="bpr", eps=8.0, seed=0, through="defended")
  key = lambda table=None: catalogue.fingerprint(spec, params=params, consts=consts,
                                                 image_shape=images.shape, images=images,
                                                 **({"table": table} if table is not None
                                                    else {}))
  table = np.asarray(models.features(consts, models.denoise(params, to_float(images))))
  assert key() == catalogue.fingerprint(spec, params=params, consts=consts,
                                        image_shape=images.shape, images=images, table=None)
  assert key(table) != key()
  assert key(table + 1) != key(table)
  craft = lambda **kw: catalogue.cached_attack_catalogue(
      spec, cache_dir=str(tmp_path), models=models, params=params, consts=consts, data=data,
      mesh=mesh, batch_size=8, items=np.arange(8), **kw)
  clean_adv, stats = craft()
  assert not stats["cached"] and "objective_table" not in stats
  assert craft()[1]["cached"]
  deployed_adv, stats = craft(table=table)  # Not served the clean-table attack.
  assert not stats["cached"] and stats["objective_table"] == "deployed"
  assert craft(table=table)[1]["cached"]
  assert not craft()[1]["cached"]  # And the other way round.
  assert not np.array_equal(clean_adv, deployed_adv)


# ---- Config, records ---------------------------------------------------------------------------

def test_bpr_other_is_a_recorded_difference_that_retrains_the_stages(tfds_dir):
  config = tiny_config(tfds_dir)
  assert config.defense.bpr_other == "clean"
  names = stage_names(config)
  first = names[0]
  before = records.stage_fields(config, first, names[:1])
  # The old value is left out of the record: workdirs trained before the option stay valid.
  assert "defense.bpr_other" not in before
  legacy = config.to_dict()
  del legacy["defense"]["bpr_other"]
  assert records.stage_fields(legacy, first, names[:1]) == before
  changed = apply_overrides(config, ("defense.bpr_other=defended",), where="test")
  validate(changed)
  after = records.stage_fields(changed, first, names[:1])
  assert after["defense.bpr_other"] == "defended"
  assert records.differences(before, after) == ["config.defense.bpr_other: (absent) -> 'defended'"]
  # An ablation variant adopts no stage that uses the BPR term, but shares those that do not.
  for i, name in enumerate(names):
    uses = any("bpr" in config.stages[s].terms for s in names[:i + 1])
    same = (records.shaping_fields(changed, name, names[:i + 1])
            == records.shaping_fields(config, name, names[:i + 1]))
    assert same != uses, name
  bad = apply_overrides(config, ("defense.bpr_other=deployed",), where="test")
  with pytest.raises(ConfigError, match="defense.bpr_other"):
    validate(bad)
  bad = apply_overrides(config, ("attack.whitebox_table=defended",), where="test")
  with pytest.raises(ConfigError, match="attack.whitebox_table"):
    validate(bad)


def test_training_loop_gives_the_step_the_other_items_photos(tfds_dir, tmp_path, monkeypatch):
  """train_defense puts the photos of every triplet's other item in the batch exactly where
  the step needs them (a stage with the BPR term under 'defended')."""
  seen, holder = [], {}
  real = defense.make_defense_step

  def spy(*args, bpr_other="clean", **kwargs):
    step = real(*args, bpr_other=bpr_other, **kwargs)

    def wrapped(state, batch, consts, key):
      seen.append((bpr_other, OTHER_IMAGES in batch, kwargs["weights"].get("bpr", 0.0)))
      if OTHER_IMAGES in batch:
        want = other_items({k: np.asarray(v) for k, v in batch["triplets"].items()})
        np.testing.assert_array_equal(batch[OTHER_IMAGES], holder["exp"].data.images[want])
      return step(state, batch, consts, key)
    return wrapped

  monkeypatch.setattr(defense, "make_defense_step", spy)
  config = tiny_config(tfds_dir)
  config.defense.bpr_other = "defended"
  for name, stage in config.stages.items():
    stage.epochs = int(name in ("denoiser_fgsm", "detector"))
  exp = holder["exp"] = build(config, str(tmp_path))
  defense.train_defense(exp, make_consts(exp), exp.params, str(tmp_path))
  assert seen and all(has == (o == "defended" and w > 0) for o, has, w in seen)
  assert {w > 0 for _, _, w in seen} == {True, False}  # denoiser_fgsm has it, detector not.
