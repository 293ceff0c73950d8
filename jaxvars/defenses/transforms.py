"""Randomised input transformations (Xie et al., ICLR 2018: random resizing and padding).

Shapes stay static (one compile): each image is scaled by a random factor
``s in [min_scale, 1]`` and placed at a random offset inside a zero canvas of the
original size, in one ``jax.image.scale_and_translate`` call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RAND_PADS = ("zero", "border")  # config.denoiser.rand_pad
# config.denoiser.rand_order: 'after' = rand(D(x)) (the paper: the random resize + pad is
# imposed on the denoised image), 'before' = D(rand(x)).
RAND_ORDERS = ("after", "before")


def random_resize_pad(images: jax.Array, key: jax.Array, *, min_scale: float,
                      pad: str = "zero") -> jax.Array:
  """Random resize to a smaller size and random padding back (per image).

  Args:
    images: float32 [B, H, W, C] in [0, 1].
    key: PRNG key.
    min_scale: smallest scale factor, in (0, 1]; the resized side is ``s * H`` with
      ``s ~ U(min_scale, 1)``.
    pad: 'zero' (Xie et al.: black padding) or 'border' (the mean colour of the image's
      border, so product photos on a light background keep it).

  Returns:
    float32 [B, H, W, C]: the shrunk image at a random position, padding around it.

  Raises:
    ValueError: ``min_scale`` outside (0, 1] or an unknown ``pad``.
  """
  if not 0.0 < min_scale <= 1.0:
    raise ValueError(f"min_scale={min_scale} must be in (0, 1]")
  if pad not in RAND_PADS:
    raise ValueError(f"pad={pad!r} is not one of {RAND_PADS}")
  b, h, w, _ = images.shape
  k_scale, k_y, k_x = jax.random.split(key, 3)
  scale = jax.random.uniform(k_scale, (b,), minval=min_scale, maxval=1.0)
  off_y = jax.random.uniform(k_y, (b,)) * (1.0 - scale) * h
  off_x = jax.random.uniform(k_x, (b,)) * (1.0 - scale) * w

  def one(img, s, ty, tx):
    return jax.image.scale_and_translate(img, img.shape, (0, 1), jnp.stack([s, s]),
                                         jnp.stack([ty, tx]), method="linear", antialias=True)

  out = jax.vmap(one)(images, scale, off_y, off_x)
  if pad == "border":
    coverage = jax.vmap(one)(jnp.ones_like(images[..., :1]), scale, off_y, off_x)
    border = jnp.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]],
                             axis=1).mean(axis=1)  # [B, C]
    out = out + (1.0 - coverage) * border[:, None, None, :]
  return out
