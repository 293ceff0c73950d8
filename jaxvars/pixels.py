"""Pixel units: photos are stored as uint8 0..255 and models see float32 in [0, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images_uint8: jax.Array) -> jax.Array:
  """uint8 [..., H, W, 3] in 0..255 -> float32 in [0, 1]."""
  return images_uint8.astype(jnp.float32) / 255.0


def to_uint8(images: jax.Array) -> jax.Array:
  """float [..., H, W, 3] in [0, 1] -> uint8 0..255 (rounded to the nearest level)."""
  return jnp.round(images * 255.0).astype(jnp.uint8)
