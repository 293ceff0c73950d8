"""FGSM / PGD: eps-ball and [0, 1] bounds (property-based), gradient vs finite differences,
PGD monotone in its number of steps, 8-bit quantisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxvars.attacks import fgsm, pgd, project_linf, quantize_8bit
from jaxvars.attacks.objectives.bpr import item_bpr_loss
from jaxvars.backbones.resnet import make_resnet
from jaxvars.data import splits
from jaxvars.features import normalize_features
from jaxvars.recommenders.vbpr import VBPR


def _quadratic_loss(key, shape):
  w = jax.random.normal(key, shape)
  return lambda x: jnp.sum(w * x) + jnp.sum(jnp.sin(3.0 * x))


@functools.partial(jax.jit, static_argnames=("steps",))
def _three_attacks(x, eps, key, steps):
  """FGSM, PGD and unquantised FGSM of one batch, one program per (shape, steps): eps is
  traced, so hypothesis's examples reuse the compiled program instead of compiling each."""
  loss = _quadratic_loss(key, x.shape)
  return (fgsm(loss, x, eps=eps),
          pgd(loss, x, eps=eps, alpha=eps / 3, steps=steps, key=jax.random.fold_in(key, 2)),
          fgsm(loss, x, eps=eps, quantize=False))


@settings(max_examples=25, deadline=None)
@given(bhw=st.sampled_from([(1, 1, 1), (2, 1, 7), (1, 5, 3), (3, 9, 9)]),
       eps=st.floats(0.5, 64.0), seed=st.integers(0, 10_000), on_grid=st.booleans(),
       steps=st.integers(1, 4))
def test_attacks_stay_in_eps_ball_and_unit_box(bhw, eps, seed, on_grid, steps):
  key = jax.random.key(seed)
  x = jax.random.uniform(jax.random.fold_in(key, 1), (*bhw, 3))
  if on_grid:
    x = quantize_8bit(x)
  for adv in _three_attacks(x, jnp.float32(eps), key, steps):
    adv, xs = np.asarray(adv, np.float64), np.asarray(x, np.float64)
    assert adv.shape == xs.shape
    assert np.all(adv >= 0.0) and np.all(adv <= 1.0)
    assert np.max(np.abs(adv - xs)) <= eps / 255.0 + 1e-6


@settings(max_examples=10, deadline=None)
@given(eps=st.integers(1, 32), seed=st.integers(0, 10_000))
def test_outputs_are_8_bit_for_8_bit_inputs(eps, seed):
  key = jax.random.key(seed)
  x = quantize_8bit(jax.random.uniform(key, (2, 5, 5, 3)))
  loss = _quadratic_loss(key, x.shape)
  for adv in (fgsm(loss, x, eps=eps), pgd(loss, x, eps=eps, alpha=2, steps=3, key=key)):
    levels = np.asarray(adv, np.float64) * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_fgsm_moves_every_free_pixel_by_eps_along_the_gradient_sign():
  x = jnp.full((1, 4, 4, 3), 0.5)
  w = jax.random.normal(jax.random.key(0), x.shape)
  adv = fgsm(lambda z: jnp.sum(w * z), x, eps=8, quantize=False)
  np.testing.assert_allclose(adv - x, 8 / 255 * np.sign(w), atol=1e-7)


def _tiny_recommender():
  """A tiny ResNet + VBPR and the item-BPR attack loss of 3 item images."""
  backbone = make_resnet("resnet18", width=4, small_stem=True)
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
  bvars = backbone.init(jax.random.key(1), images)
  feature_dim = backbone.feature_dim
  vbpr = VBPR(num_users=6, num_items=10, feature_dim=feature_dim, factors=4, init_scale=0.5)
  vparams = vbpr.init(jax.random.key(2), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                      jnp.zeros((1, feature_dim)))["params"]
  train_users = np.array([0, 0, 1, 2, 3, 4, 5, 5])
  train_items = np.array([0, 1, 2, 0, 3, 4, 1, 5])
  items = np.array([0, 1, 2], np.int32)
  triplets = splits.item_triplets(items, train_users=train_users, train_items=train_items,
                                  num_users=6, num_items=10,
                                  positive_keys=splits.pair_keys(train_users, train_items, 10),
                                  per_role=3, rng=np.random.default_rng(0))
  others = jax.random.normal(jax.random.key(3), (10, feature_dim))
  stats = {"mean": jnp.zeros(feature_dim), "std": jnp.ones(feature_dim)}

  def losses(x):  # One loss per image [3].
    f = normalize_features(backbone.apply(bvars, x)["pooled"], stats, "standardize")
    return item_bpr_loss(f, items=jnp.asarray(items), triplets=triplets,
                         score_fn=lambda u, i, feat: vbpr.apply({"params": vparams}, u, i, feat),
                         other_features=others)
  return losses, images


def test_attack_gradient_matches_finite_differences():
  losses, x = _tiny_recommender()
  loss = lambda z: jnp.sum(losses(z))
  g = np.asarray(jax.grad(loss)(x))
  flat = np.argsort(-np.abs(g).ravel())[:5]  # The most influential pixels.
  h = 1e-2
  for idx in flat:
    d = np.zeros(x.size, np.float32)
    d[idx] = h
    d = d.reshape(x.shape)
    fd = (float(loss(x + d)) - float(loss(x - d))) / (2 * h)
    assert g.ravel()[idx] == pytest.approx(fd, rel=0.05, abs=1e-4)
  adv = fgsm(loss, x, eps=4, quantize=False)
  moved = np.sign(np.asarray(adv - x)).ravel()[flat]
  np.testing.assert_array_equal(moved, np.sign(g.ravel()[flat]))
  assert float(loss(adv)) > float(loss(x))  # The attack raises the BPR loss.


def test_pgd_with_more_steps_never_lowers_any_images_loss():
  losses, x = _tiny_recommender()
  key = jax.random.key(5)
  values = np.array([losses(pgd(losses, x, eps=8, alpha=2, steps=k, key=key, quantize=False))
                     for k in range(1, 7)])  # [steps, images]: per-image best iterates.
  assert np.all(values[1:] >= values[:-1] - 1e-5), values
  assert np.all(values[-1] > np.asarray(losses(x)))


def test_pgd_keeps_each_images_best_iterate():
  """One step up helps image 1 a little and hurts image 0 more: a best iterate kept for the
  whole batch would keep neither step; kept per image, image 1 keeps its step."""
  x = jnp.full((2, 1, 1, 1), 0.5)

  def losses(z):
    p = z[:, 0, 0, 0]
    return jnp.stack([-100.0 * (p[0] - 0.5) ** 2 + 1e-3 * p[0], p[1]])

  adv = pgd(losses, x, eps=8, alpha=4, steps=1, random_start=False, quantize=False)
  np.testing.assert_allclose(adv[:, 0, 0, 0], [0.5, 0.5 + 4 / 255], atol=1e-6)
  batch = pgd(lambda z: jnp.sum(losses(z)), x, eps=8, alpha=4, steps=1, random_start=False,
              quantize=False)
  np.testing.assert_allclose(batch[:, 0, 0, 0], [0.5, 0.5], atol=1e-6)


def test_pgd_unrolled_equals_the_while_loop():
  """On CPU PGD unrolls its loop (XLA's CPU runtime is 2-20x slower on convolution input
  gradients inside a while loop); both forms must give the same attack: same photos (8-bit
  grid) and the same loss curve, through a convolution like the denoiser's."""
  x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4)) * 0.3
  v = jax.random.normal(jax.random.key(2), (4,))

  def losses(z):
    h = jax.lax.conv_general_dilated(z, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(h) @ v, axis=(1, 2))

  runs = {u: jax.jit(lambda z, u=u: pgd(losses, z, eps=8, alpha=2, steps=4,
                                        key=jax.random.key(3), unroll=u,
                                        return_curve=True))(x) for u in (True, False)}
  (adv_u, curve_u), (adv_l, curve_l) = runs[True], runs[False]
  np.testing.assert_array_equal(np.round(np.asarray(adv_u) * 255),
                                np.round(np.asarray(adv_l) * 255))
  np.testing.assert_allclose(curve_u, curve_l, rtol=1e-5, atol=1e-6)
  assert float(curve_u[-1]) > float(curve_u[0])  # The attack climbed.


def test_pgd_needs_a_key_for_its_random_start():
  with pytest.raises(ValueError, match="needs a PRNG key"):
    pgd(lambda z: jnp.sum(z), jnp.zeros((1, 2, 2, 3)), eps=8, alpha=2, steps=1)


def test_projection():
  x = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(project_linf(jnp.array([-1.0, 0.9, 2.0]), x, 8),
                             [0.0, 0.5 + 8 / 255, 1.0], rtol=1e-6)
