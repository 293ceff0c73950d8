"""``config.data.image_store``: the catalogue memory-mapped from a ``.npy`` beside the
prepared images table instead of held in memory (issue 36: a catalogue larger than host
memory), with the same photos, the same attacked catalogues and the same features; and
``batched_map``'s ``out`` that streams a result into such a file."""

import logging
import os

import numpy as np
import pytest

from conftest import tiny_config, tiny_models
from jaxvars import features, sharding
from jaxvars.attacks import catalogue
from jaxvars.attacks.spec import AttackSpec
from jaxvars.data import pipeline
from jaxvars.errors import ConfigError
from test_objectives import _data


def _config(tfds_dir, store, **fields):
  config = tiny_config(tfds_dir)
  config.data.image_store = store
  for k, v in fields.items():
    config.data[k] = v
  return config


def test_auto_maps_only_a_catalogue_above_a_quarter_of_host_memory(monkeypatch, tmp_path):
  data = _config(tmp_path, "auto").data
  need = 1000 * data.image_size ** 2 * 3
  monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 4 * need + 4)
  assert pipeline.image_store(data, 1000) == "memory"
  monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 4 * need - 4)
  assert pipeline.image_store(data, 1000) == "mmap"
  monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 0)  # Unknown: in memory.
  assert pipeline.image_store(data, 1000) == "memory"
  assert pipeline.image_store(_config(tmp_path, "mmap").data, 1) == "mmap"
  with pytest.raises(ConfigError, match=r"config.data.image_store='disk' is not one of"):
    pipeline.image_store(_config(tmp_path, "disk").data, 1)


def test_mapped_photos_equal_the_photos_in_memory_and_are_written_once(tfds_dir, tiny_data,
                                                                       caplog):
  mapped = pipeline.load(_config(tfds_dir, "mmap").data, workdir=None)
  assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
  assert not isinstance(tiny_data.images, np.memmap)
  np.testing.assert_array_equal(mapped.images, tiny_data.images)
  np.testing.assert_array_equal(mapped.item_ids, tiny_data.item_ids)
  path = mapped.images.filename
  assert os.path.basename(path).startswith(pipeline.PIXELS_PREFIX)
  stamp = os.stat(path).st_mtime_ns
  again = pipeline.load(_config(tfds_dir, "mmap").data, workdir=None)
  assert again.images.filename == path and os.stat(path).st_mtime_ns == stamp  # Reused.
  # A truncated file (a crash while copying it by hand) is written again, with a warning.
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    repaired = pipeline.load(_config(tfds_dir, "mmap").data, workdir=None)
  assert any("cannot be read" in r.getMessage() and path in r.getMessage()
             for r in caplog.records)
  np.testing.assert_array_equal(repaired.images, tiny_data.images)


def test_mmap_dir_must_be_local(tfds_dir):
  with pytest.raises(ConfigError, match=r"config.data.mmap_dir"):
    pipeline.load(_config(tfds_dir, "mmap", mmap_dir="gs://bucket/pixels").data, workdir=None)


def test_an_attack_on_a_mapped_catalogue_is_streamed_to_its_cache_file(tmp_path):
  """FGSM on every photo of a memory-mapped catalogue: the attacked catalogue is written to
  the cache file batch by batch and mapped back, byte-equal to the attack in memory, with the
  same stats; a second call loads it (checksum verified)."""
  models, params, consts, images, users, items = tiny_models(num_items=40)
  path = tmp_path / "pixels.npy"
  np.save(path, images)
  mapped = np.load(path, mmap_mode="r")
  spec = AttackSpec(method="fgsm", objective="bpr", eps=8.0, seed=0)
  kw = dict(models=models, params=params, consts=consts, mesh=sharding.make_mesh(1),
            batch_size=8)
  in_memory, stats_memory = catalogue.cached_attack_catalogue(
      spec, cache_dir=str(tmp_path / "memory"), data=_data(images, users, items), **kw)
  streamed, stats = catalogue.cached_attack_catalogue(
      spec, cache_dir=str(tmp_path / "mapped"), data=_data(mapped, users, items), **kw)
  assert not isinstance(in_memory, np.memmap) and isinstance(streamed, np.memmap)
  assert streamed.filename == str(tmp_path / "mapped" / "fgsm@8.npy")
  np.testing.assert_array_equal(streamed, in_memory)
  assert np.abs(streamed.astype(int) - images).max() == 8  # The attack moved the photos.
  for key in ("linf", "l2", "loss_curve", "items_attacked"):
    assert stats[key] == stats_memory[key], key
  assert sorted(os.listdir(tmp_path / "mapped")) == ["fgsm@8.json", "fgsm@8.npy"]  # No temp.
  again, stats = catalogue.cached_attack_catalogue(
      spec, cache_dir=str(tmp_path / "mapped"), data=_data(mapped, users, items), **kw)
  assert stats["cached"]
  np.testing.assert_array_equal(again, in_memory)


def test_batched_map_writes_into_out_and_checks_it_first():
  import jax
  import jax.numpy as jnp
  mesh = sharding.make_mesh(1)
  x = np.arange(37 * 3, dtype=np.float32).reshape(37, 3)
  fn = jax.jit(lambda b: {"y": (b["x"] * 2).astype(jnp.int32), "s": b["x"].sum(1)})
  target = np.full((37, 3), -1, np.int32)
  got = features.batched_map(fn, {"x": x}, batch_size=8, mesh=mesh, desc="t", workers=2,
                             out={"y": target})
  assert got["y"] is target
  np.testing.assert_array_equal(target, (x * 2).astype(np.int32))
  np.testing.assert_allclose(got["s"], x.sum(1))
  calls = []
  with pytest.raises(ValueError, match=r"out\['y'\] holds 36 rows for 37 inputs"):
    features.batched_map(lambda b: calls.append(1), {"x": x}, batch_size=8, mesh=mesh,
                         desc="t", out={"y": np.zeros((36, 3), np.int32)})
  assert not calls  # Checked before any batch runs.
  with pytest.raises(ValueError, match=r"out\['y'\] is float32"):
    features.batched_map(fn, {"x": x}, batch_size=8, mesh=mesh, desc="t",
                         out={"y": np.zeros((37, 3), np.float32)})
