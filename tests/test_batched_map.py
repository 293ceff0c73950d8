"""``features.batched_map`` with concurrent batches (the CPU default) returns exactly what
one batch at a time returns, in order, and passes on a batch's error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvars import features, sharding


@jax.jit
def _fn(batch):
  # A conv-free but non-trivial program: a per-row reduction and a matmul, a pytree output.
  x = batch["x"]
  w = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 7.0
  return {"proj": jnp.tanh(x @ w), "norm": jnp.sqrt(jnp.sum(x * x, axis=1)),
          "item": batch["item"] * 2}


def _inputs(n):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 3)).astype(np.float32), "item": np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize("n", [1, 16, 37, 101])
def test_concurrent_batches_equal_one_at_a_time(n):
  mesh = sharding.make_mesh(1)
  inputs = _inputs(n)
  one = features.batched_map(_fn, inputs, batch_size=8, mesh=mesh, desc="t", workers=1)
  many = features.batched_map(_fn, inputs, batch_size=8, mesh=mesh, desc="t", workers=3)
  assert one["proj"].shape == (n, 4) and many["norm"].shape == (n,)
  for key in one:
    np.testing.assert_array_equal(many[key], one[key])
  np.testing.assert_array_equal(many["item"], 2 * np.arange(n))  # In order, no padding rows.
  w = np.arange(12.0, dtype=np.float32).reshape(3, 4) / 7.0
  np.testing.assert_allclose(many["proj"], np.tanh(inputs["x"] @ w), rtol=1e-5, atol=1e-6)


def test_concurrent_batches_only_on_a_one_device_cpu_mesh(monkeypatch):
  assert len(jax.devices()) >= 2, "conftest.py should simulate 8 CPU devices"
  assert features.concurrent_batches(sharding.make_mesh(1)) == features.CPU_CONCURRENT_BATCHES
  assert features.concurrent_batches(sharding.make_mesh(2)) == 1
  monkeypatch.setattr(features, "CPU_CONCURRENT_BATCHES", 1)
  assert features.concurrent_batches(sharding.make_mesh(1)) == 1


def test_a_program_with_large_temporaries_runs_one_batch_at_a_time(monkeypatch):
  """The memory guard: a jitted program whose XLA temporaries exceed ``max_temp_bytes``
  runs one batch at a time (no thread pool), one below it keeps the concurrent batches, and
  both return what the plain one-at-a-time map returns."""
  mesh = sharding.make_mesh(1)
  inputs = _inputs(37)
  pools = []
  original = features._concurrent

  def spy(run, starts, workers):
    pools.append(workers)
    return original(run, starts, workers)

  monkeypatch.setattr(features, "_concurrent", spy)
  plain = features.batched_map(_fn, inputs, batch_size=8, mesh=mesh, desc="t", workers=1)
  assert pools == []
  guarded = features.batched_map(_fn, inputs, batch_size=8, mesh=mesh, desc="t", workers=2,
                                 max_temp_bytes=-1)  # Every program's temporaries exceed it.
  assert pools == []
  overlapped = features.batched_map(_fn, inputs, batch_size=8, mesh=mesh, desc="t",
                                    workers=2, max_temp_bytes=1 << 40)
  assert pools == [2]
  for key in plain:
    np.testing.assert_array_equal(guarded[key], plain[key])
    np.testing.assert_array_equal(overlapped[key], plain[key])
  # The temporaries are XLA's own count for the compiled program.
  big = jax.jit(lambda b: {"y": jnp.cumsum(jnp.outer(b["x"][:, 0], jnp.ones(4096)), axis=1)
                           .sum(1)})
  temp = big.lower(sharding.shard_batch({"x": inputs["x"][:8]}, mesh)).compile(
      ).memory_analysis().temp_size_in_bytes
  assert temp > 0
  features.batched_map(big, {"x": inputs["x"]}, batch_size=8, mesh=mesh, desc="t", workers=2,
                       max_temp_bytes=temp - 1)
  features.batched_map(big, {"x": inputs["x"]}, batch_size=8, mesh=mesh, desc="t", workers=2,
                       max_temp_bytes=temp)
  assert pools == [2, 2]


def test_an_error_in_a_concurrent_batch_reaches_the_caller():
  mesh = sharding.make_mesh(1)
  calls = []

  def fn(batch):
    calls.append(int(batch["item"][0]))
    if int(batch["item"][0]) == 24:
      raise ValueError("batch at item 24 failed")
    return _fn(batch)

  with pytest.raises(ValueError, match="item 24"):
    features.batched_map(fn, _inputs(64), batch_size=8, mesh=mesh, desc="t", workers=2)
  assert 24 in calls and len(calls) <= 8


def test_an_attacked_catalogue_does_not_depend_on_concurrent_batches(monkeypatch):
  """PGD through the backbone and the features of the catalogue through the denoiser (the
  convolutions XLA's CPU runtime runs in two programs at once), one batch at a time and two:
  identical bytes."""
  from conftest import tiny_models
  from test_objectives import _data

  import ml_collections

  from jaxvars.attacks.catalogue import attack_catalogue
  from jaxvars.attacks.spec import AttackSpec
  from jaxvars.evaluation.system_features import systems_features

  models, params, consts, images, users, items = tiny_models()
  data = _data(images, users, items)
  mesh = sharding.make_mesh(1)
  spec = AttackSpec(method="pgd", objective="bpr", eps=8.0, steps=3, alpha_ratio=0.5)
  config = ml_collections.ConfigDict({"denoiser": {"rand_min_scale": 0.875, "rand_pad": "zero",
                                                   "rand_order": "after"}})
  out = {}
  for workers in (1, 2):
    monkeypatch.setattr(features, "CPU_CONCURRENT_BATCHES", workers)
    adv, _ = attack_catalogue(spec, models=models, params=params, consts=consts, data=data,
                              mesh=mesh, batch_size=8)
    feats = systems_features(("undefended", "defended", "defended_rand"), models=models,
                             params=params, consts=consts, images=adv, mesh=mesh,
                             batch_size=8, config=config, seed=0, draws=2)
    out[workers] = (adv, feats)
  np.testing.assert_array_equal(out[2][0], out[1][0])
  assert np.abs(out[1][0].astype(int) - images).max() > 0  # The attack did move pixels.
  for name, f in out[1][1].items():
    np.testing.assert_array_equal(out[2][1][name], f, err_msg=name)


def test_systems_with_host_callbacks_run_one_batch_at_a_time(monkeypatch):
  """JPEG's codec is a host callback: on a one-device CPU mesh its features come from a
  pass of one batch at a time, the other systems from the concurrent pass, and every
  system's features equal those of the single pass (one batch at a time) bit for bit."""
  from conftest import tiny_models

  import ml_collections

  from jaxvars.defenses import SYSTEMS
  from jaxvars.evaluation.system_features import systems_features

  assert SYSTEMS.get("jpeg").host_callback and not SYSTEMS.get("defended").host_callback
  models, params, consts, images, _, _ = tiny_models()
  mesh = sharding.make_mesh(1)
  config = ml_collections.ConfigDict({"systems": {"jpeg_quality": 75, "bit_depth": 5}})
  names = ("undefended", "defended", "jpeg", "bit_depth")
  calls = []
  original = features.batched_map

  def spy(fn, inputs, **kwargs):
    calls.append((kwargs["desc"], kwargs.get("workers")))
    return original(fn, inputs, **kwargs)

  monkeypatch.setattr("jaxvars.evaluation.system_features.batched_map", spy)
  out = {}
  for workers in (1, 2):
    monkeypatch.setattr(features, "CPU_CONCURRENT_BATCHES", workers)
    out[workers] = systems_features(names, models=models, params=params, consts=consts,
                                    images=images, mesh=mesh, batch_size=8, config=config,
                                    seed=0)
  assert calls == [("undefended/defended/jpeg/bit_depth features", 1),
                   ("undefended/defended/bit_depth features", None), ("jpeg features", 1)]
  for name in names:
    np.testing.assert_array_equal(out[2][name], out[1][name], err_msg=name)
