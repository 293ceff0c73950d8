"""The jitted BPR step gives the same result on 1 device and on 8 simulated devices."""

import jax
import numpy as np
import optax
import pytest

import ml_collections
from flax.training.train_state import TrainState

from jaxvars import sharding
from jaxvars.errors import ConfigError
from jaxvars.recommenders import build_recommender
from jaxvars.training.recommender import make_bpr_step


def _run(num_devices, form):
  assert len(jax.devices()) >= 8, "conftest.py should simulate 8 CPU devices"
  mesh = sharding.make_mesh(num_devices)
  rec = build_recommender(ml_collections.ConfigDict(dict(
      name="vbpr", factors=8, visual_factors=8, form=form, init_scale=0.1, reg=1e-3,
      reg_visual=1e-3)), num_users=50, num_items=80, feature_dim=16)
  params = rec.init(jax.random.key(0), 16)
  state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))
  state = jax.device_put(state, sharding.replicated(mesh))
  features = jax.device_put(jax.random.normal(jax.random.key(1), (80, 16)),
                            sharding.replicated(mesh))
  step = make_bpr_step(rec, mesh)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    batch = {"user": rng.integers(0, 50, 64, dtype=np.int32),
             "pos": rng.integers(0, 80, 64, dtype=np.int32),
             "neg": rng.integers(0, 80, 64, dtype=np.int32)}
    state, m = step(state, sharding.shard_batch(batch, mesh), features)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.parametrize("form", ["tang", "he"])
def test_one_and_eight_devices_agree(form):
  loss1, params1 = _run(1, form)
  loss8, params8 = _run(8, form)
  np.testing.assert_allclose(loss1, loss8, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_batch_is_really_split_over_devices():
  mesh = sharding.make_mesh(8)
  x = sharding.shard_batch(np.arange(64, dtype=np.int32), mesh)
  assert len(x.addressable_shards) == 8
  assert {s.data.shape for s in x.addressable_shards} == {(8,)}


def test_indivisible_batch_and_too_many_devices_are_errors():
  mesh = sharding.make_mesh(8)
  with pytest.raises(ConfigError, match="config.recommender.batch_size=100 is not divisible by the 8"):
    sharding.check_divisible(100, mesh, "config.recommender.batch_size")
  with pytest.raises(ConfigError, match="config.num_devices=999"):
    sharding.make_mesh(999)
