"""Building blocks shared by every model: a convolution that is fast on XLA's CPU backend.

XLA's CPU convolution is pathologically slow on tiny feature maps: a 3x3 convolution on a
2x2 map (ResNet stage 4 at 64 px), batch 32, 512 -> 512 channels, runs at about 2 GFLOP/s,
100x slower than PyTorch, while the same convolution written as
``lax.conv_general_dilated_patches`` + one matrix product is as fast as a GEMM. From
about 4x4 up XLA's own convolution is the faster of the two. ``conv_general_dilated``
below is a drop-in replacement for ``lax.conv_general_dilated`` that takes the
patches + matmul form where the *output* map is small (``SMALL_MAP_MAX_SIDE``, chosen by
``benchmarks/small_map_conv.py``) and the program runs on a CPU, and XLA's convolution
everywhere else (GPU and TPU always use their own). The choice is static: it depends on
shapes and on the platform the program is lowered for (``jax.lax.platform_dependent``),
never on values, so it costs nothing at run time and both forms give the same outputs
and gradients (to float32 rounding; ``tests/test_layers.py``).

``Conv`` is ``flax.linen.Conv`` with this function plugged in: same parameters
(``kernel`` HWIO, ``bias``), same names, so checkpoints and weight imports are unchanged.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Largest output side (max of height and width) that takes the patches + matmul form on
# CPU. Measured with benchmarks/small_map_conv.py (2 CPU cores, jax 0.10.2): at 1x1 to 3x3
# outputs the patches form is 3-60x faster than XLA's convolution, forward and backward;
# at 4x4 the two are within 10% of each other, and XLA's convolution wins from 6x6 up.
SMALL_MAP_MAX_SIDE = 3

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


def _out_side(size: int, k: int, stride: int, dilation: int, pad) -> int:
  lo, hi = pad
  return (size + lo + hi - (dilation * (k - 1) + 1)) // stride + 1


def patches_conv(lhs, rhs, window_strides, padding, *, rhs_dilation=None,
                 feature_group_count: int = 1, precision=None):
  """An NHWC/HWIO convolution as ``conv_general_dilated_patches`` + a matrix product.

  Args:
    lhs: float [B, H, W, C]. rhs: float [kh, kw, C // groups, O].
    window_strides, padding, rhs_dilation: as ``lax.conv_general_dilated`` (2-D; padding
      a string or ((lo, hi), (lo, hi))).
    feature_group_count: 1 (a dense convolution) or C with O == C (depthwise).

  Returns:
    [B, H', W', O], equal to ``lax.conv_general_dilated`` with the same arguments.

  Raises:
    NotImplementedError: for other group counts.
  """
  kh, kw, cin_per_group, out = rhs.shape
  c = lhs.shape[-1]
  patches = lax.conv_general_dilated_patches(
      lhs, (kh, kw), window_strides, padding, rhs_dilation=rhs_dilation,
      dimension_numbers=_NHWC, precision=precision)  # [B, H', W', C * kh * kw], C major.
  b, ho, wo, _ = patches.shape
  if feature_group_count == 1:
    kernel = jnp.transpose(rhs, (2, 0, 1, 3)).reshape(c * kh * kw, out)
    return jnp.dot(patches, kernel, precision=precision)
  if feature_group_count == c and cin_per_group == 1 and out == c:
    kernel = jnp.transpose(rhs.reshape(kh * kw, c))  # [C, kh * kw]
    return jnp.einsum("bhwck,ck->bhwc", patches.reshape(b, ho, wo, c, kh * kw), kernel,
                      precision=precision)
  raise NotImplementedError(f"patches_conv: feature_group_count={feature_group_count} with "
                            f"{c} input and {out} output channels")


def use_patches(lhs_shape, rhs_shape, window_strides, padding, *, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                batch_group_count: int = 1, max_side: int | None = None) -> bool:
  """Whether :func:`conv_general_dilated` takes the patches form on CPU for these shapes:
  a 2-D NHWC convolution without input dilation or batch groups, dense or depthwise, whose
  output map is at most ``max_side`` (default: the module's ``SMALL_MAP_MAX_SIDE``, read at
  call time; 0 turns the patches form off) on each side, and whose kernel is larger than
  1x1 (a 1x1 convolution is a matrix product already)."""
  max_side = SMALL_MAP_MAX_SIDE if max_side is None else max_side
  if len(lhs_shape) != 4 or not _is_nhwc(dimension_numbers) or batch_group_count != 1:
    return False
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return False
  kh, kw, cin_per_group, out = rhs_shape
  c = lhs_shape[-1]
  if kh * kw == 1:
    return False
  if feature_group_count != 1 and not (feature_group_count == c and cin_per_group == 1
                                       and out == c):
    return False
  dil = tuple(rhs_dilation or (1, 1))
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs_shape[1:3], (dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1),
                               window_strides, padding)
  else:
    pads = padding
  ho = _out_side(lhs_shape[1], kh, window_strides[0], dil[0], pads[0])
  wo = _out_side(lhs_shape[2], kw, window_strides[1], dil[1], pads[1])
  return max(ho, wo) <= max_side


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` that runs small-map convolutions as patches + matmul on
  CPU (see the module docstring). Same signature, outputs and gradients."""
  xla = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if preferred_element_type is not None or not use_patches(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count):
    return xla(lhs, rhs)
  small = functools.partial(patches_conv, window_strides=window_strides, padding=padding,
                            rhs_dilation=rhs_dilation, feature_group_count=feature_group_count,
                            precision=precision)
  return lax.platform_dependent(lhs, rhs, cpu=small, default=xla)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
Conv.__doc__ = ("``flax.linen.Conv`` whose small-map convolutions take the fast CPU form "
                "(:func:`conv_general_dilated`); same parameters and names.")
