"""Building blocks shared by every model: a convolution that is fast on XLA's CPU backend.

XLA's CPU convolution is pathologically slow in two cases:

* dense convolutions on tiny feature maps: a 3x3 convolution on a 2x2 map (ResNet stage 4
  at 64 px) runs tens of times below the machine's matrix-product speed (and PyTorch's),
  while the same convolution written as ``lax.conv_general_dilated_patches`` + one matrix
  product runs at GEMM speed (from 3x3 up XLA's own convolution is the faster of the two);
* depthwise convolutions (EfficientNet's), at every size: several times slower than the sum
  over the k x k taps of a shifted slice times the per-channel weights
  (``shift_add_depthwise``).

``conv_general_dilated`` below is a drop-in replacement for ``lax.conv_general_dilated``
that, when the program runs on a CPU, takes the shift-and-add form for depthwise
convolutions and the patches + matmul form for dense ones whose *output* map is small
(``SMALL_MAP_MAX_SIDE``, chosen by ``benchmarks/small_map_conv.py``), and XLA's
convolution everywhere else (GPU and TPU always use their own). The choice is static: it
depends on shapes and on the platform the program is lowered for
(``jax.lax.platform_dependent``), never on values, so it costs nothing at run time and
every form gives the same outputs and gradients (to float32 rounding;
``tests/test_layers.py``).

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
# CPU, chosen with benchmarks/small_map_conv.py (3x3 kernels, 256 and 512 channels): at 1x1
# and 2x2 outputs the patches form beats XLA's convolution forward and backward; from 3x3 up
# XLA's convolution is the faster, the backward pass by far.
SMALL_MAP_MAX_SIDE = 2
# Depthwise convolutions take the shift-and-add form on CPU (False: XLA's convolution; read
# at trace time, for benchmarks that measure what the fast forms buy).
DEPTHWISE_SHIFT_ADD = True

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


def _depthwise_taps(x, w, window_strides, pads, dil, out_hw):
  """sum over the taps (i, j) of ``x[:, i*d : ..: s, j*d : ..: s, :] * w[i, j]`` for a padded
  ``x`` [B, H+pads, W+pads, C] and ``w`` [kh, kw, C]."""
  kh, kw, c = w.shape
  ho, wo = out_hw
  sh, sw = window_strides
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x, (0, i * dil[0], j * dil[1], 0),
                      (x.shape[0], i * dil[0] + (ho - 1) * sh + 1,
                       j * dil[1] + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
      term = tap * w[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift_add(lhs, w, window_strides, pads, dil):
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = _out_side(lhs.shape[1], w.shape[0], window_strides[0], dil[0], pads[0])
  wo = _out_side(lhs.shape[2], w.shape[1], window_strides[1], dil[1], pads[1])
  return _depthwise_taps(x, w, window_strides, pads, dil, (ho, wo))


def _shift_add_fwd(lhs, w, window_strides, pads, dil):
  return _shift_add(lhs, w, window_strides, pads, dil), (lhs, w)


def _shift_add_bwd(window_strides, pads, dil, res, g):
  """The input gradient is itself a stride-1 shift-and-add: the output gradient, spread to
  the strided positions (interior zeros) and padded by the kernel's extent, correlated with
  the flipped kernel; the kernel gradient is a reduction per tap."""
  lhs, w = res
  kh, kw, c = w.shape
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  ext_h, ext_w = dil[0] * (kh - 1), dil[1] * (kw - 1)
  # g spread onto the padded input's grid: position y*s in [0, Hp - ext), then zero margins.
  hp, wp = x.shape[1], x.shape[2]
  spread = lax.pad(g, jnp.zeros((), g.dtype),
                   ((0, 0, 0),
                    (ext_h, hp - ext_h - ((g.shape[1] - 1) * sh + 1) + ext_h, sh - 1),
                    (ext_w, wp - ext_w - ((g.shape[2] - 1) * sw + 1) + ext_w, sw - 1),
                    (0, 0, 0)))
  dxp = _depthwise_taps(spread, w[::-1, ::-1], (1, 1), None, dil, (hp, wp))
  dx = dxp[:, pads[0][0]:pads[0][0] + lhs.shape[1], pads[1][0]:pads[1][0] + lhs.shape[2], :]
  ho, wo = g.shape[1], g.shape[2]
  dw = jnp.stack([jnp.stack([
      jnp.sum(lax.slice(x, (0, i * dil[0], j * dil[1], 0),
                        (x.shape[0], i * dil[0] + (ho - 1) * sh + 1,
                         j * dil[1] + (wo - 1) * sw + 1, c), (1, sh, sw, 1)) * g, axis=(0, 1, 2))
      for j in range(kw)]) for i in range(kh)])
  return dx, dw.astype(w.dtype)


_shift_add.defvjp(_shift_add_fwd, _shift_add_bwd)


def shift_add_depthwise(lhs, rhs, window_strides, padding, *, rhs_dilation=None,
                        precision=None):
  """An NHWC depthwise convolution as a sum over its k x k taps of strided slices of the
  padded input times the tap's per-channel weights; its gradients are shift-and-adds too
  (a custom VJP: autodiff of the strided slices is several times slower on CPU).

  Args:
    lhs: float [B, H, W, C]. rhs: float [kh, kw, 1, C] (HWIO, ``feature_group_count=C``).
    window_strides, padding, rhs_dilation: as ``lax.conv_general_dilated`` (2-D).

  Returns:
    [B, H', W', C], equal to ``lax.conv_general_dilated(..., feature_group_count=C)``.
  """
  del precision  # Elementwise products: no matmul precision to set.
  kh, kw, _, c = rhs.shape
  dil = tuple(rhs_dilation or (1, 1))
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], (dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1),
                               window_strides, padding)
  else:
    pads = padding
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  return _shift_add(lhs, rhs.reshape(kh, kw, c), tuple(window_strides), pads, dil)


def is_depthwise(lhs_shape, rhs_shape, *, dimension_numbers=None, feature_group_count: int = 1,
                 lhs_dilation=None, batch_group_count: int = 1) -> bool:
  """Whether a convolution is a 2-D NHWC depthwise one (one filter per input channel)."""
  if len(lhs_shape) != 4 or not _is_nhwc(dimension_numbers) or batch_group_count != 1:
    return False
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return False
  c = lhs_shape[-1]
  return feature_group_count == c > 1 and rhs_shape[2] == 1 and rhs_shape[3] == c


def use_patches(lhs_shape, rhs_shape, window_strides, padding, *, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                batch_group_count: int = 1, max_side: int | None = None) -> bool:
  """Whether :func:`conv_general_dilated` takes the patches form on CPU for these shapes:
  a dense (``feature_group_count == 1``) 2-D NHWC convolution without input dilation or
  batch groups whose output map is at most ``max_side`` (default: the module's
  ``SMALL_MAP_MAX_SIDE``, read at call time; 0 turns the patches form off) on each side,
  and whose kernel is larger than 1x1 (a 1x1 convolution is a matrix product already).
  Depthwise convolutions take :func:`shift_add_depthwise` instead."""
  max_side = SMALL_MAP_MAX_SIDE if max_side is None else max_side
  if len(lhs_shape) != 4 or not _is_nhwc(dimension_numbers) or batch_group_count != 1:
    return False
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return False
  kh, kw, _, _ = rhs_shape
  if kh * kw == 1 or feature_group_count != 1:
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
  if preferred_element_type is not None:
    return xla(lhs, rhs)
  if DEPTHWISE_SHIFT_ADD and is_depthwise(
      lhs.shape, rhs.shape, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, lhs_dilation=lhs_dilation,
      batch_group_count=batch_group_count):
    fast = functools.partial(shift_add_depthwise, window_strides=window_strides,
                             padding=padding, rhs_dilation=rhs_dilation, precision=precision)
  elif use_patches(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count, batch_group_count=batch_group_count):
    fast = functools.partial(patches_conv, window_strides=window_strides, padding=padding,
                             rhs_dilation=rhs_dilation, precision=precision)
  else:
    return xla(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=xla)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
Conv.__doc__ = ("``flax.linen.Conv`` whose depthwise and small-map convolutions take the fast "
                "CPU forms (:func:`conv_general_dilated`); same parameters and names.")


# ---------------------------------------------------------------------------
# Max pooling with a fast backward pass on CPU.
# ---------------------------------------------------------------------------

def _pool_taps(x, window, strides, pads):
  """The k x k strided taps of a padded NHWC map: a list of [B, H', W', C] slices, row-major."""
  kh, kw = window
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)), constant_values=-jnp.inf)
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  return [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * sh + 1,
                                       j + (wo - 1) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)], xp.shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(x, window, strides, pads):
  taps, _ = _pool_taps(x, window, strides, pads)
  out = taps[0]
  for t in taps[1:]:
    out = jnp.maximum(out, t)
  return out


def _max_pool_fwd(x, window, strides, pads):
  out = _max_pool_taps(x, window, strides, pads)
  return out, (x, out)


def _max_pool_bwd(window, strides, pads, res, g):
  """Each output's gradient goes to the first tap (row-major) that holds the maximum, as
  XLA's select-and-scatter does; the taps' gradients are placed back with strided pads."""
  x, out = res
  taps, padded_shape = _pool_taps(x, window, strides, pads)
  kh, kw = window
  sh, sw = strides
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(padded_shape, g.dtype)
  for k, t in enumerate(taps):
    i, j = divmod(k, kw)
    hit = (t == out) & ~taken
    taken = taken | hit
    contrib = jnp.where(hit, g, 0.0)
    config = [(0, 0, 0),
              (i, padded_shape[1] - i - (contrib.shape[1] - 1) * sh - 1, sh - 1),
              (j, padded_shape[2] - j - (contrib.shape[2] - 1) * sw - 1, sw - 1),
              (0, 0, 0)]
    grad = grad + lax.pad(contrib, jnp.zeros((), g.dtype), config)
  (ph0, _), (pw0, _) = pads
  return (grad[:, ph0:ph0 + x.shape[1], pw0:pw0 + x.shape[2], :],)


_max_pool_taps.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window_shape, strides, padding):
  """``flax.linen.max_pool`` for NHWC maps whose gradient on CPU is a sum over the window's
  taps (XLA's CPU select-and-scatter, the standard backward, is an order of magnitude slower
  than the pool itself, e.g. for ResNet's stem pool). Same values and
  gradients (ties go to the first maximal tap, as select-and-scatter does).

  Args:
    x: float [B, H, W, C]. window_shape, strides: 2-tuples. padding: ((lo, hi), (lo, hi))
      or 'SAME' / 'VALID'.
  """
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
  else:
    pads = tuple(tuple(p) for p in padding)
  window, strides, pads = tuple(window_shape), tuple(strides), tuple(pads)
  fast = lambda x: _max_pool_taps(x, window, strides, pads)
  default = lambda x: nn.max_pool(x, window, strides, padding=pads)
  return lax.platform_dependent(x, cpu=fast, default=default)
