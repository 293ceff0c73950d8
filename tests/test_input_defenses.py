"""The JPEG and bit-depth defended systems: outputs against PIL and numpy references, the
BPDA (identity) gradient, their place in the systems registry and the config checks."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, tiny_models
from jaxvars import configuration, sharding
from jaxvars.defenses import SYSTEMS
from jaxvars.defenses.bit_depth import reduce_bit_depth
from jaxvars.defenses.jpeg import jpeg_compress
from jaxvars.errors import ConfigError
from jaxvars.evaluation.system_features import system_features


def _photos(n=3, size=24, seed=0):
  """Smooth random photos on the 8-bit grid (a gradient plus blobs), float32 in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    c = rng.random((3, 3))
    img = np.stack([c[k, 0] + c[k, 1] * yy + c[k, 2] * xx for k in range(3)], -1)
    out.append(np.clip(img / img.max(), 0, 1))
  return np.round(np.stack(out) * 255) / 255


def _pil_jpeg(x, quality):
  buffer = io.BytesIO()
  Image.fromarray(np.round(x * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")) / 255.0


def test_jpeg_equals_pil_and_degrades_with_quality():
  x = _photos()
  got = np.asarray(jax.jit(lambda z: jpeg_compress(z, 50))(jnp.asarray(x, jnp.float32)))
  want = np.stack([_pil_jpeg(img, 50) for img in x])
  np.testing.assert_allclose(got, want, atol=1e-6)
  errors = [np.abs(np.asarray(jpeg_compress(jnp.asarray(x, jnp.float32), q)) - x).mean()
            for q in (95, 50, 10)]
  assert 0 < errors[0] < errors[1] < errors[2]


def test_jpeg_backward_is_the_identity():
  x = jnp.asarray(_photos(2), jnp.float32)
  w = jax.random.normal(jax.random.key(0), x.shape)
  g = jax.grad(lambda z: jnp.sum(w * jpeg_compress(z, 30)))(x)
  np.testing.assert_allclose(g, w, rtol=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bit_depth_levels_error_and_gradient(bits):
  x = jnp.asarray(_photos(2, seed=bits), jnp.float32)
  y = np.asarray(reduce_bit_depth(x, bits), np.float64)
  levels = 2 ** bits - 1
  np.testing.assert_allclose(y * levels, np.round(y * levels), atol=1e-4)
  assert np.abs(y - np.asarray(x)).max() <= 0.5 / levels + 1e-6
  if bits == 8:  # 8-bit photos are already on the grid.
    np.testing.assert_allclose(y, x, atol=1e-6)
  w = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(w * reduce_bit_depth(z, bits)))(x), w,
                             rtol=1e-6)


@pytest.mark.parametrize("name,reference", [
    ("jpeg", lambda x: np.stack([_pil_jpeg(i, 75) for i in x])),
    ("bit_depth", lambda x: np.round(x * 31) / 31)])
def test_systems_rank_what_the_transform_makes_on_eight_devices(name, reference, tfds_dir):
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir)
  mesh = sharding.make_mesh(8)
  got = system_features(name, models=models, params=params, consts=consts, images=images,
                        mesh=mesh, batch_size=16, seed=0, config=config)
  transformed = reference(images / 255.0).astype(np.float32)
  want = np.asarray(models.features(consts, jnp.asarray(transformed)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert SYSTEMS.get(name).settings(config) in ({"jpeg_quality": 75}, {"bit_depth": 5})


@pytest.mark.parametrize("field,value,message", [
    ("systems.jpeg_quality", 0, r"config.systems.jpeg_quality=0 must be an integer in \[1, 95\]"),
    ("systems.bit_depth", 9, r"config.systems.bit_depth=9 must be an integer in \[1, 8\]")])
def test_settings_are_validated(field, value, message, tfds_dir):
  with pytest.raises(ConfigError, match=message):
    configuration.validate(tiny_config(tfds_dir, **{field: value}))
