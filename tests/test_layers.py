"""The fast CPU convolutions: every form gives XLA's outputs and gradients, and the form is
chosen by static shape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxvars import layers

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("side,cin,cout,k,stride,padding,groups", [
    (2, 16, 8, 3, 1, ((1, 1), (1, 1)), 1),   # ResNet stage 4 at 64 px.
    (1, 16, 8, 3, 1, "SAME", 1),             # ... at 32 px.
    (4, 8, 8, 3, 2, ((1, 1), (1, 1)), 1),    # A strided conv down to 2x2.
    (3, 12, 12, 5, 1, "SAME", 12),           # Depthwise 5x5 (EfficientNet).
    (6, 12, 12, 3, 2, "SAME", 12),           # Depthwise, strided, asymmetric SAME padding.
    (16, 8, 8, 5, 2, ((2, 2), (1, 2)), 8),   # Depthwise on a larger map, explicit padding.
    (8, 4, 4, 3, 1, "SAME", 1),              # A large map: XLA's own convolution.
])
def test_outputs_and_gradients_equal_xla(side, cin, cout, k, stride, padding, groups):
  x = jax.random.normal(jax.random.key(0), (3, side, side, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout)) * 0.2
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                              dimension_numbers=DN, feature_group_count=groups)
  chosen = lambda x, w: layers.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=DN, feature_group_count=groups)
  patches = lambda x, w: layers.patches_conv(x, w, (stride, stride), padding,
                                             feature_group_count=groups)
  forms = [chosen, patches]
  if groups > 1:
    forms.append(lambda x, w: layers.shift_add_depthwise(x, w, (stride, stride), padding))
  for new in forms:
    np.testing.assert_allclose(jax.jit(new)(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    for a, b in zip(jax.jit(jax.grad(loss(new), argnums=(0, 1)))(x, w),
                    jax.grad(loss(ref), argnums=(0, 1))(x, w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_the_form_is_chosen_by_output_size():
  choose = lambda side, k=3, stride=1, groups=1, c=8: layers.use_patches(
      (2, side, side, c), (k, k, c // groups, c), (stride, stride), "SAME",
      dimension_numbers=DN, feature_group_count=groups)
  assert choose(1) and choose(2) and choose(layers.SMALL_MAP_MAX_SIDE)
  assert not choose(layers.SMALL_MAP_MAX_SIDE + 1) and not choose(16)
  assert choose(8, stride=4)  # Output 2x2 from an 8x8 input.
  assert not choose(2, k=1)  # A 1x1 conv is a matrix product already.
  assert not choose(2, groups=8) and not choose(2, groups=2)  # Dense convolutions only.
  depthwise = lambda groups, c=8: layers.is_depthwise(
      (2, 16, 16, c), (3, 3, c // groups, c), dimension_numbers=DN, feature_group_count=groups)
  assert depthwise(8) and not depthwise(1) and not depthwise(2)
  assert not layers.use_patches((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), "SAME",
                                dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_conv_module_has_flax_conv_parameters():
  x = jax.random.normal(jax.random.key(2), (2, 2, 2, 4))
  ours, theirs = layers.Conv(8, (3, 3), padding=1), nn.Conv(8, (3, 3), padding=1)
  variables = theirs.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(3), x)) == jax.tree.map(jnp.shape,
                                                                                  variables)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool.
    ((1, 8, 6, 2), (2, 2), (2, 2), "VALID"),
    ((2, 7, 7, 4), (3, 3), (1, 1), "SAME")])
def test_max_pool_equals_flax_with_ties(shape, window, strides, padding):
  x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2  # Many ties.
  ref = lambda x: nn.max_pool(x, window, strides, padding=padding)
  ours = lambda x: layers.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(jax.jit(ours)(x), ref(x))
  w = jax.random.normal(jax.random.key(1), ref(x).shape)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda z: jnp.sum(ours(z) * w)))(x),
                             jax.grad(lambda z: jnp.sum(ref(z) * w))(x), rtol=1e-5, atol=1e-6)
