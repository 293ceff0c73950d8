"""AlexRank (jaxvars/recommenders/alexrank.py, AIP eq. 1) and fitting instead of training
(Recommender.fit, jaxvars/training/recommender.py:fit_recommender), on small random arrays:

* the expanded score equals eq. 1 computed by a plain double loop over each user's bought
  items (users of different history lengths, a repeated pair counted once), in every
  broadcasting layout the evaluation and the attacks use, with the same ranking;
* INSA's objective on AlexRank is eq. 6 (divided by the number of users), with its gradient;
* the fit is checkpointed like a trained recommender: rerun and restore give identical
  parameters and scores, with an empty history and no optimiser state;
* a user without a training item is refused by name; config checks.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import joint
from jaxvars import configuration, sharding
from jaxvars.attacks.objectives import OBJECTIVES, AttackContext
from jaxvars.errors import CheckpointError, ConfigError, DataError
from jaxvars.recommenders import RECOMMENDERS, build_recommender
from jaxvars.recommenders.alexrank import user_profiles
from jaxvars.training import records, recommender as rec_training


def _alexrank(num_users, num_items, feature_dim):
  config = joint.get_config("tiny")
  config.recommender.name = "alexrank"
  return build_recommender(config.recommender, num_users=num_users, num_items=num_items,
                           feature_dim=feature_dim)


def _data(num_users=6, num_items=15, feature_dim=8, seed=0, offset=0.0):
  """Users with 1, 2, ... distinct training items (user 0: one), plus a repeated pair;
  features ~ N(offset, 1)."""
  rng = np.random.default_rng(seed)
  bought = [rng.choice(num_items, n, replace=False) for n in range(1, num_users + 1)]
  users = np.concatenate([np.full(len(b), u) for u, b in enumerate(bought)]).astype(np.int32)
  items = np.concatenate(bought).astype(np.int32)
  users, items = np.r_[users, users[3]], np.r_[items, items[3]]  # A repeated pair.
  order = rng.permutation(len(users))  # Pairs in no particular order.
  f = (offset + rng.standard_normal((num_items, feature_dim))).astype(np.float32)
  return users[order], items[order], f, [set(b.tolist()) for b in bought]


def _eq1(f, bought):
  """p_ui of eq. 1 [U, I], float64, by the double loop over each user's bought items."""
  f = np.asarray(f, np.float64)
  out = np.zeros((len(bought), len(f)))
  for u, items in enumerate(bought):
    for i in range(len(f)):
      out[u, i] = -sum(np.sum((f[i] - f[j]) ** 2) for j in items) / len(items)
  return out


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_score_equals_eq1_and_ranks_the_same(offset):
  """offset=10: features far from the origin (||f||^2 ~ 800 >> the distances' spread), where
  the expanded square's terms cancel most."""
  users, items, f, bought = _data(offset=offset)
  rec = _alexrank(6, 15, 8)
  params = rec.fit(rec.init(jax.random.key(0), 8), users, items, jnp.asarray(f))
  want = _eq1(f, bought)
  scale = np.abs(want).max()
  # The full ranking's layout: users [U, 1], items [1, I], features [1, I, F].
  full = np.asarray(rec.score(params, jnp.arange(6)[:, None], jnp.arange(15)[None],
                              jnp.asarray(f)[None]))
  assert full.shape == (6, 15) and full.dtype == np.float32
  np.testing.assert_allclose(full, want, rtol=0, atol=2e-6 * scale)
  # One pair per entry (BPR triplets, the candidate protocol): users, items [N], features [N, F].
  u, i = np.meshgrid(np.arange(6), np.arange(15), indexing="ij")
  flat = np.asarray(rec.score(params, jnp.asarray(u.ravel()), jnp.asarray(i.ravel()),
                              jnp.asarray(f[i.ravel()])))
  np.testing.assert_allclose(flat.reshape(6, 15), want, rtol=0, atol=2e-6 * scale)
  # The same ranking of every user's items: every pair of items eq. 1 separates by more than
  # the tolerance is ordered the same. (Eq. 1 has exact ties: a user with two items scores
  # both -||f_i - f_j||^2 / 2.)
  order_want = np.sign(want[:, :, None] - want[:, None, :])
  order_got = np.sign(full[:, :, None] - full[:, None, :])
  separated = np.abs(want[:, :, None] - want[:, None, :]) > 1e-5 * scale
  assert separated.sum() > 0.95 * 6 * 15 * 14
  np.testing.assert_array_equal(order_got[separated], order_want[separated])
  assert want[1, 7] == want[1, 8] and bought[1] == {7, 8}
  # The user's history is a set: user 2's repeated pair counts once (counted twice, the
  # mean would differ by far more than the tolerance).
  f64, keys = np.asarray(f, np.float64), users.astype(np.int64) * 15 + items
  repeated = int(np.bincount(keys).argmax())
  assert repeated // 15 == 2 and np.sum(keys == repeated) == 2 and len(bought[2]) == 3
  j = repeated % 15
  with_repeat = (want[2] * 3 - np.sum((f64 - f64[j]) ** 2, axis=1)) / 4
  assert np.abs(with_repeat - want[2]).max() > 100 * 2e-6 * scale


def test_profiles_are_the_means_of_the_bought_items():
  users, items, f, bought = _data(feature_dim=5, offset=3.0)
  c, m, s = user_profiles(users, items, f, 6)
  assert c.shape == (5,) and m.shape == (6, 5) and s.shape == (6,)
  assert c.dtype == m.dtype == s.dtype == np.float32
  np.testing.assert_allclose(c, f.astype(np.float64).mean(0), rtol=1e-6)
  for u, b in enumerate(bought):
    rows = f[sorted(b)].astype(np.float64) - c
    np.testing.assert_allclose(m[u], rows.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s[u], np.mean(np.sum(rows ** 2, 1)), rtol=1e-6)
  # Blocks smaller than the data (a user's pairs split across blocks) give the same.
  from jaxvars.recommenders import alexrank
  chunk = alexrank._CHUNK
  try:
    alexrank._CHUNK = 4
    c4, m4, s4 = user_profiles(users, items, f, 6)
  finally:
    alexrank._CHUNK = chunk
  np.testing.assert_allclose(c4, c, rtol=1e-6)
  np.testing.assert_allclose(m4, m, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s4, s, rtol=1e-6)


def test_a_user_without_training_items_is_refused_by_name():
  users, items, f, _ = _data()
  keep = users != 2
  with pytest.raises(DataError, match=r"1 of 6 users have no training item \(e.g. user "
                                      r"indices \[2\]\)"):
    user_profiles(users[keep], items[keep], f, 6)
  with pytest.raises(DataError, match=r"indices \[6\]"):  # A user past the last one bought.
    user_profiles(users, items, f, 7)
  with pytest.raises(ValueError, match="out of range"):
    user_profiles(users, items, f, 5)
  with pytest.raises(ValueError, match="differ in length"):
    user_profiles(users, items[:-1], f, 6)


def test_interface_no_training_no_penalty_no_visual_embedding():
  rec = _alexrank(6, 15, 8)
  assert (rec.name, rec.label) == ("alexrank", "AlexRank") and "alexrank" in RECOMMENDERS.names()
  params = rec.init(jax.random.key(0), 8)
  assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
      "center": ((8,), jnp.float32), "user_mean": ((6, 8), jnp.float32),
      "user_sq_norm": ((6,), jnp.float32)}
  assert rec.fitted and rec.training_stages(100) == () and rec.penalty_weights == ()
  u = jnp.array([0, 1])
  assert rec.penalty_terms(params, u, u, u) == ()
  assert rec.uses_features and rec.visual_fn(params) is None  # Its visual space is f itself.
  assert rec == _alexrank(6, 15, 8)  # Value equality (a jit static argument).
  # A trained recommender has no fit; a fit_fn of the wrong shapes is refused.
  vbpr = build_recommender(joint.get_config("tiny").recommender, num_users=6, num_items=15,
                           feature_dim=8)
  assert not vbpr.fitted
  with pytest.raises(TypeError, match="'vbpr' is trained"):
    vbpr.fit(vbpr.init(jax.random.key(0), 8), u, u, jnp.zeros((15, 8)))
  bad = dataclasses.replace(rec, fit_fn=lambda p, *a: dict(p, user_sq_norm=jnp.zeros(5)))
  with pytest.raises(ValueError, match="not of the structure, shapes and dtypes"):
    bad.fit(params, u, u, jnp.zeros((15, 8)))


def test_insa_is_eq6_and_the_feature_objective_works_in_feature_space():
  """AIP eq. 6 for AlexRank: maximise sum_u p_ui(f). The 'insa' objective (the mean over all
  users) is that sum / U; its gradient in f is 2 (mean_u m_u - f)."""
  users, items, f, bought = _data()
  rec = _alexrank(6, 15, 8)
  params = rec.fit(rec.init(jax.random.key(0), 8), users, items, jnp.asarray(f))
  targets = jnp.array([3, 11])
  adv = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8)), jnp.float32)
  ctx = AttackContext(features=lambda x: x, score_fn=rec.score_fn(params),
                      visual_fn=rec.visual_fn(params), items=targets, table=jnp.asarray(f),
                      num_users=6)
  # Eq. 6's sum over users of -mean_{j in I_u+} ||f(x_i + delta) - f(x_j)||^2 (clean f_j).
  f64, a64 = np.asarray(f, np.float64), np.asarray(adv, np.float64)
  want = [sum(-np.mean([np.sum((a64[b] - f64[j]) ** 2) for j in items_u]) for items_u in bought)
          for b in range(2)]
  insa = OBJECTIVES.get("insa").loss
  np.testing.assert_allclose(np.asarray(insa(ctx, adv)) * 6, want, rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(insa(ctx, x)))(adv)
  m = np.mean([f64[sorted(b)].mean(0) for b in bought], axis=0)
  np.testing.assert_allclose(grad, 2 * (m - np.asarray(adv, np.float64)), rtol=1e-4, atol=1e-5)
  # 'feature': the distance between the attacked and the clean feature, in feature space.
  dist = OBJECTIVES.get("feature").loss(ctx, adv)
  np.testing.assert_allclose(dist, np.linalg.norm(np.asarray(adv) - f[np.asarray(targets)],
                                                  axis=1), rtol=1e-5)


# ---- Fitting through train_recommender: checkpoint, record, restore ------------------------

def _fake_exp(config, users, items, f):
  """What train_recommender and restore read of an Experiment, from arrays."""
  num_users, (num_items, feature_dim) = int(users.max()) + 1, f.shape
  rec = build_recommender(config.recommender, num_users=num_users, num_items=num_items,
                          feature_dim=feature_dim)
  data = types.SimpleNamespace(train_users=users, train_items=items, num_items=num_items,
                               num_users=num_users)
  exp = types.SimpleNamespace(
      config=config, data=data, mesh=sharding.make_mesh(1), rec_steps_per_epoch=1, inputs=None,
      models=types.SimpleNamespace(recommender=rec),
      params={"recommender": rec.init(jax.random.key(config.seed), feature_dim)},
      backbone_vars={"w": jnp.arange(3.0)})
  return exp, {"features": jnp.asarray(f)}


def test_fit_is_checkpointed_and_restored_with_identical_scores(tmp_path):
  config = joint.get_config("tiny")
  config.recommender.name = "alexrank"
  users, items, f, bought = _data()
  exp, consts = _fake_exp(config, users, items, f)
  state, history, n_steps, seconds = rec_training.train_recommender(exp, consts, str(tmp_path))
  assert history == [] and n_steps == 0 and int(state.step) == 0 and seconds >= 0
  assert jax.tree.leaves(state.opt_state) == []  # No optimiser state.
  fitted = user_profiles(users, items, f, 6)
  for name, value in zip(("center", "user_mean", "user_sq_norm"), fitted):
    np.testing.assert_array_equal(state.params[name], value)
  directory = str(tmp_path / "checkpoints" / "recommender")
  record = records.load(directory)
  assert record["done"] and record["history"] == [] and record["seconds"] == seconds
  assert record["fields"]["recommender.name"] == "alexrank"
  assert not any(k.startswith("recommender.adv_") for k in record["fields"])  # AMR's.

  def scores(params):
    return np.asarray(exp.models.recommender.score(
        params, jnp.arange(6)[:, None], jnp.arange(15)[None], consts["features"][None]))

  clean = scores(state.params)
  np.testing.assert_allclose(clean, _eq1(f, bought), rtol=0, atol=2e-6 * np.abs(clean).max())
  # A rerun restores the fit (nothing is fitted again: the fit's inputs are ignored).
  exp.data.train_items = np.roll(items, 1)
  again, history2, n2, seconds2 = rec_training.train_recommender(exp, consts, str(tmp_path))
  assert history2 == [] and n2 == 0 and seconds2 == seconds
  np.testing.assert_array_equal(scores(again.params), clean)
  # --mode=evaluate's restore: the same parameters, step 0.
  restored, backbone, step = rec_training.restore(exp, str(tmp_path))
  assert step == 0 and int(restored.step) == 0
  np.testing.assert_array_equal(scores(restored.params), clean)
  # Another backbone's fit is refused, not silently reused.
  other, _ = _fake_exp(config, users, items, f)
  other.backbone_vars = {"w": jnp.arange(3.0) + 1}
  with pytest.raises(CheckpointError, match="backbone"):
    rec_training.train_recommender(other, consts, str(tmp_path))


def test_a_non_finite_feature_table_stops_the_fit_before_any_checkpoint(tmp_path):
  from jaxvars.errors import NonFiniteLossError
  config = joint.get_config("tiny")
  config.recommender.name = "alexrank"
  users, items, f, _ = _data()
  f[int(items[0])] = np.nan
  exp, consts = _fake_exp(config, users, items, f)
  with pytest.raises(NonFiniteLossError, match="AlexRank: the fitted parameters are not finite"):
    rec_training.train_recommender(exp, consts, str(tmp_path))
  assert records.load(str(tmp_path / "checkpoints" / "recommender")) is None


def test_config_alexrank_validates_and_refuses_training_it_in_a_defence_stage():
  config = joint.get_config("tiny")
  config.recommender.name = "alexrank"
  configuration.validate(config)
  config.stages.joint.trainable = ("denoiser", "recommender")
  with pytest.raises(ConfigError, match=r"config.stages.joint.trainable includes 'recommender'"):
    configuration.validate(config)
  config.stages.joint.epochs = 0  # A skipped stage trains nothing.
  configuration.validate(config)
  vbpr = joint.get_config("tiny")  # A trained recommender may be fine-tuned there.
  vbpr.stages.joint.trainable = ("denoiser", "recommender")
  configuration.validate(vbpr)
