"""Image fidelity of the denoiser: how far ``D(x)`` is from the clean photo (a defence that
rewrites every upload changes what shoppers see).

* :func:`psnr`: peak signal-to-noise ratio, dB, per image (peak 1.0 on [0, 1] pixels).
* :func:`ssim`: structural similarity (Wang et al. 2004) per image: Gaussian window
  sigma 1.5 (11 x 11), K1 = 0.01, K2 = 0.03, data range 1, per channel over the valid
  window positions, averaged (the convention of scikit-image's
  ``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False,
  data_range=1)``, which ``tests/test_fidelity.py`` checks it against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): an 11 x 11 window.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr_of_mse(mse):
  """PSNR (dB) of a mean squared error of pixels in [0, 1]: 10 log10(1 / mse), capped at
  100 dB (mse 1e-10 and below, e.g. identical images)."""
  return jnp.minimum(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)), 100.0)


def psnr(images: jax.Array, reference: jax.Array) -> jax.Array:
  """PSNR (dB) [B] of float images [B, H, W, C] in [0, 1] against ``reference`` (same shape);
  capped at 100 dB for identical images."""
  return psnr_of_mse(jnp.mean(jnp.square(images - reference), axis=(1, 2, 3)))


def _gaussian_window() -> np.ndarray:
  r = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
  g = np.exp(-(r ** 2) / (2 * SSIM_SIGMA ** 2))
  g /= g.sum()
  return np.outer(g, g).astype(np.float32)


def ssim(images: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean SSIM [B] of float images [B, H, W, C] in [0, 1] against ``reference``.

  Raises:
    ValueError: images smaller than the 11 x 11 window.
  """
  b, h, w, c = images.shape
  size = 2 * SSIM_RADIUS + 1
  if h < size or w < size:
    raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {h}x{w}")
  window = jnp.asarray(_gaussian_window())[:, :, None, None] * jnp.ones((1, 1, 1, c))

  def blur(x):  # Depthwise Gaussian filter over the valid positions.
    return jax.lax.conv_general_dilated(x, window, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)

  x, y = images.astype(jnp.float32), reference.astype(jnp.float32)
  mx, my = blur(x), blur(y)
  vx = blur(x * x) - mx * mx
  vy = blur(y * y) - my * my
  cxy = blur(x * y) - mx * my
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))
