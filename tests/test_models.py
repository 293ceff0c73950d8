"""VBPR scores and loss against numpy references; ResNet outputs; feature extraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvars import losses, sharding
from jaxvars.backbones.resnet import make_resnet
from jaxvars.features import FeatureExtractor, normalize_features
from jaxvars.pixels import to_float
from jaxvars.recommenders import Recommender
from jaxvars.recommenders.vbpr import VBPR
from jaxvars.training.recommender import bpr_objective


def _vbpr(form):
  model = VBPR(num_users=7, num_items=11, feature_dim=5, factors=4, visual_factors=3, form=form,
               init_scale=0.5)
  u = jnp.array([0, 3, 6, 2])
  i = jnp.array([1, 10, 4, 4])
  f = jax.random.normal(jax.random.key(1), (4, 5))
  params = model.init(jax.random.key(0), u, i, f)["params"]
  if form == "he":  # Non-zero biases so every term is exercised.
    params = dict(params, item_bias=jax.random.normal(jax.random.key(2), (11,)))
  return model, params, np.asarray(u), np.asarray(i), np.asarray(f)


def test_vbpr_tang_matches_numpy():
  model, p, u, i, f = _vbpr("tang")
  got = model.apply({"params": p}, u, i, f)
  P, Q, E = (np.asarray(p[k], np.float64) for k in ("user_factors", "item_factors",
                                                     "visual_projection"))
  want = [P[a] @ (Q[b] + E.T @ f[k]) for k, (a, b) in enumerate(zip(u, i))]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vbpr_he_matches_numpy():
  model, p, u, i, f = _vbpr("he")
  got = model.apply({"params": p}, u, i, f)
  g_u, g_i, E, t_u, b_i, b_v = (np.asarray(p[k], np.float64) for k in (
      "user_factors", "item_factors", "visual_projection", "user_visual_factors", "item_bias",
      "visual_bias"))
  want = [b_i[b] + g_u[a] @ g_i[b] + t_u[a] @ (E.T @ f[k]) + b_v @ f[k]
          for k, (a, b) in enumerate(zip(u, i))]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bpr_loss_matches_numpy():
  pos = np.array([2.0, -1.0, 0.3, 30.0])
  neg = np.array([1.0, 1.0, 0.3, -30.0])
  want = np.mean(-np.log(1 / (1 + np.exp(-(pos - neg)))))
  assert float(losses.bpr(pos_scores=jnp.asarray(pos), neg_scores=jnp.asarray(neg))) == \
      pytest.approx(want, rel=1e-6)


def test_objective_gradient_matches_finite_differences():
  model, p, u, i, f = _vbpr("tang")
  features = jax.random.normal(jax.random.key(3), (11, 5))
  batch = {"user": jnp.asarray(u), "pos": jnp.asarray(i), "neg": jnp.array([2, 3, 5, 9])}
  rec = Recommender(name="vbpr", label="VBPR", module=model, penalty_weights=(0.1, 0.2))
  fn = lambda e: bpr_objective(dict(p, visual_projection=e), batch, features, recommender=rec)[0]
  g = jax.grad(fn)(p["visual_projection"])
  e = np.asarray(p["visual_projection"], np.float64)
  d = np.zeros_like(e)
  d[2, 1] = 1e-3
  fd = (float(fn(jnp.asarray(e + d, jnp.float32))) - float(fn(jnp.asarray(e - d, jnp.float32)))) / 2e-3
  assert float(g[2, 1]) == pytest.approx(fd, rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("arch,small,size,dims", [
    ("resnet18", True, 32, {"stage1": 32, "stage2": 16, "stage3": 8, "stage4": 4, "pooled": 64}),
    ("resnet50", False, 64, {"stage1": 16, "stage2": 8, "stage3": 4, "stage4": 2, "pooled": 256}),
])
def test_resnet_outputs(arch, small, size, dims):
  model = make_resnet(arch, width=8, small_stem=small)
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 3))
  variables = model.init(jax.random.key(1), x)
  out = model.apply(variables, x)
  assert model.feature_dim == dims["pooled"]
  assert out["pooled"].shape == (2, dims["pooled"])
  for s in ("stage1", "stage2", "stage3", "stage4"):
    assert out[s].shape[1] == dims[s], s
  np.testing.assert_allclose(out["pooled"], out["stage4"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  assert set(variables) == {"params", "batch_stats"}
  assert "layer1_0" in variables["params"] and "conv1" in variables["params"]


def test_feature_extractor_pads_and_matches_direct_apply():
  model = make_resnet("resnet18", width=8, small_stem=True)
  images = np.random.default_rng(0).integers(0, 256, (21, 16, 16, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  mesh = sharding.make_mesh(8)
  feats = FeatureExtractor(model, variables, mesh, batch_size=8)(images)
  direct = model.apply(variables, to_float(jnp.asarray(images)))["pooled"]
  assert feats.shape == (21, 64)
  np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)


def test_feature_normalisations():
  f = jnp.array([[1.0, 2.0], [3.0, 6.0]])
  stats = {"mean": jnp.array([2.0, 4.0]), "std": jnp.array([1.0, 2.0])}
  np.testing.assert_allclose(normalize_features(f, stats, "standardize"), [[-1, -1], [1, 1]])
  np.testing.assert_allclose(jnp.linalg.norm(normalize_features(f, stats, "l2"), axis=1), [1, 1],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="'bogus'"):
    normalize_features(f, stats, "bogus")
