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


# ---- Sweeps (AIP 7.2): a tuple of settings, one system per value --------------------------


def test_a_sweep_is_one_system_per_setting(tfds_dir):
  from configs import joint
  from jaxvars.evaluate import evaluated_systems
  from jaxvars.evaluation.tables import systems_table
  config = tiny_config(tfds_dir)
  assert evaluated_systems(config)[-2:] == ("jpeg", "bit_depth")  # An int: as before sweeps.
  assert SYSTEMS.get("jpeg").settings(config) == {"jpeg_quality": 75}
  config = tiny_config(tfds_dir, **{"systems.jpeg_quality": (90, 10),
                                    "systems.bit_depth": [7, 3]})
  configuration.validate(config)
  assert evaluated_systems(config)[-4:] == ("jpeg_q90", "jpeg_q10", "bit_depth_7bit",
                                            "bit_depth_3bit")
  q10, b3 = SYSTEMS.get("jpeg_q10"), SYSTEMS.get("bit_depth_3bit")
  assert (q10.label, q10.settings(config), q10.host_callback) == ("JPEG q10",
                                                                  {"jpeg_quality": 10}, True)
  assert (b3.label, b3.settings(config), SYSTEMS.base_of("bit_depth_3bit")) == (
      "BitDepth 3-bit", {"bit_depth": 3}, "bit_depth")
  assert SYSTEMS.get("jpeg_q10") is q10  # One object per name (jit caches stay warm).
  # An instance's setting is its name's, whatever the config holds (white-box cache keys).
  assert SYSTEMS.get("jpeg_q50").settings(tiny_config(tfds_dir)) == {"jpeg_quality": 50}
  table = systems_table(evaluated_systems(config), tiny_models()[0].recommender, config)
  assert table["jpeg_q90"]["sweep"] == {"of": "jpeg", "field": "jpeg_quality", "value": 90}
  assert "sweep" not in table["defended"]
  with pytest.raises(ConfigError, match=r"is a sweep: each value is its own system "
                                        r"\('jpeg_q90', 'jpeg_q10'\)"):
    SYSTEMS.get("jpeg").make(config)
  for bad in ("jpeg_q0", "jpeg_q96", "jpeg_q050", "bit_depth_9bit", "bit_depth_3"):
    assert bad not in SYSTEMS
  sweep = joint.get_config("tiny,input_sweep")
  assert (sweep.systems.jpeg_quality, sweep.systems.bit_depth) == ((90, 70, 50, 30, 10),
                                                                   (7, 6, 5, 4, 3))
  assert joint.get_config("cpu,hm").systems.jpeg_quality == 75  # The presets keep their ints.


@pytest.mark.parametrize("name,value,reference", [
    ("jpeg_q30", 30, lambda x: np.stack([_pil_jpeg(i, 30) for i in x])),
    ("bit_depth_3bit", 3, lambda x: np.round(x * 7) / 7)])
def test_a_swept_setting_ranks_what_its_transform_makes(name, value, reference, tfds_dir):
  models, params, consts, images, _, _ = tiny_models()
  config = tiny_config(tfds_dir, **{"systems.jpeg_quality": (90, 30), "systems.bit_depth": (7, 3)})
  got = system_features(name, models=models, params=params, consts=consts, images=images,
                        mesh=sharding.make_mesh(8), batch_size=16, seed=0, config=config)
  transformed = reference(images / 255.0).astype(np.float32)
  want = np.asarray(models.features(consts, jnp.asarray(transformed)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("systems.jpeg_quality", (90, 0), r"config.systems.jpeg_quality=\(90, 0\) must be an integer "
                                      r"in \[1, 95\] or a non-empty tuple of distinct"),
    ("systems.jpeg_quality", (), r"config.systems.jpeg_quality=\(\) must be"),
    ("systems.bit_depth", (5, 5), r"config.systems.bit_depth=\(5, 5\) must be"),
    ("systems.bit_depth", (4, True), r"config.systems.bit_depth=\(4, True\) must be"),
    ("systems.bit_depth", "5", r"config.systems.bit_depth='5' must be an integer in \[1, 8\]")])
def test_sweeps_are_validated(field, value, message, tfds_dir):
  with pytest.raises(ConfigError, match=message):
    configuration.validate(tiny_config(tfds_dir, **{field: value}))


def test_white_box_attacks_go_through_one_named_setting(tfds_dir):
  from jaxvars.evaluate import attack_specs, evaluated_systems
  from jaxvars.evaluation.plan import PlanInputs, make_plan
  config = tiny_config(tfds_dir, **{"systems.jpeg_quality": (90, 30),
                                    "attack.adaptive.systems": ("defended", "jpeg")})
  with pytest.raises(ConfigError, match=r"config.attack.adaptive.systems names 'jpeg', but "
                                        r"config.systems.jpeg_quality=\(90, 30\) sweeps it into "
                                        r"\('jpeg_q90', 'jpeg_q30'\)"):
    configuration.validate(config)
  config.attack.adaptive.systems = ("jpeg_q30",)
  config.targeted.whitebox_systems = ("jpeg_q90",)
  configuration.validate(config)
  plan = make_plan(config, PlanInputs(systems=evaluated_systems(config),
                                      transfer=tuple(attack_specs(config)), detector=False))
  wb = [c for c in plan if c.kind == "whitebox"]
  assert [(c.name, c.systems, c.cache_key) for c in wb] == [
      ("pgd-wb@8", ("jpeg_q30",), "pgd-wb@8@jpeg_q30")]
  assert [c.name for c in plan if c.kind == "targeted" and c.spec and c.spec.through] == [
      "pgd-insa-wb@8@jpeg_q90"]
  assert next(c for c in plan if c.kind == "clean").systems[-3:] == ("jpeg_q90", "jpeg_q30",
                                                                     "bit_depth")
  # An int setting: the registered name, as before.
  configuration.validate(tiny_config(tfds_dir, **{"attack.adaptive.systems": ("jpeg",)}))


def test_report_has_one_sweep_row_per_setting():
  from jaxvars.report import tables
  row = lambda hr: {"HR@10": hr, "ci95": {"HR@10": [hr - 0.1, hr + 0.1]}}
  names = ("vbpr", "jpeg_q90", "jpeg_q10")
  results = {
      "ranking": {f"{s}/{c}": row(0.5) for s in names for c in ("clean", "pgd@8")},
      "rows": {f"{s}/{c}": {"system": s, "condition": c} for s in names for c in ("clean", "pgd@8")},
      "systems": {"vbpr": {"label": "VBPR"},
                  "jpeg_q90": {"label": "JPEG q90", "sweep": {"of": "jpeg", "field": "jpeg_quality",
                                                              "value": 90}},
                  "jpeg_q10": {"label": "JPEG q10", "sweep": {"of": "jpeg", "field": "jpeg_quality",
                                                              "value": 10}}}}
  lines = tables.input_sweep_table(results, 8.0)
  assert lines[0] == "| system | setting | HR@10 clean | HR@10 pgd@8 |"
  assert lines[2:] == ["| JPEG q90 | jpeg_quality=90 | 0.5000 [0.4000, 0.6000] | 0.5000 [0.4000, 0.6000] |",
                       "| JPEG q10 | jpeg_quality=10 | 0.5000 [0.4000, 0.6000] | 0.5000 [0.4000, 0.6000] |"]
  main = tables.main_table(results, 8.0, paper_columns=False)
  assert sum("JPEG q" in line for line in main) == 4  # Each setting its own row, per condition.
  del results["systems"]["jpeg_q90"]["sweep"], results["systems"]["jpeg_q10"]["sweep"]
  assert tables.input_sweep_table(results, 8.0) == []
