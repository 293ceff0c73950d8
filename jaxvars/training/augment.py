"""Random image augmentations for self-supervised pretraining (SimCLR, Chen et al. 2020).

Pure JAX, one explicit key per image, static shapes: ``simclr_view`` maps a batch of
float32 [B, H, W, 3] images in [0, 1] to one random view each: random resized crop
(area scale in [min_area, 1], aspect ratio in [3/4, 4/3]), horizontal flip, and with
probability ``jitter_prob`` a colour jitter (brightness, contrast, saturation by up to
``jitter``), then a random grayscale with probability 0.2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_GRAY = jnp.array([0.299, 0.587, 0.114], jnp.float32)


def _crop_resize(img, key, min_area):
  h, w = img.shape[0], img.shape[1]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, minval=min_area, maxval=1.0)
  log_ratio = jax.random.uniform(k_ratio, minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3))
  ratio = jnp.exp(log_ratio)
  ch = jnp.clip(jnp.sqrt(area / ratio), 0.1, 1.0) * h
  cw = jnp.clip(jnp.sqrt(area * ratio), 0.1, 1.0) * w
  y0 = jax.random.uniform(k_y) * (h - ch)
  x0 = jax.random.uniform(k_x) * (w - cw)
  scale = jnp.stack([h / ch, w / cw])
  return jax.image.scale_and_translate(img, img.shape, (0, 1), scale,
                                       jnp.stack([-y0 * scale[0], -x0 * scale[1]]),
                                       method="linear", antialias=True)


def _jitter(img, key, strength):
  kb, kc, ks = jax.random.split(key, 3)
  u = lambda k: jax.random.uniform(k, minval=1.0 - strength, maxval=1.0 + strength)
  img = img * u(kb)
  mean = jnp.mean(img @ _GRAY)
  img = (img - mean) * u(kc) + mean
  gray = (img @ _GRAY)[..., None]
  img = (img - gray) * u(ks) + gray
  return jnp.clip(img, 0.0, 1.0)


def _view(img, key, min_area, jitter, jitter_prob):
  k_crop, k_flip, k_jit, k_pj, k_gray = jax.random.split(key, 5)
  img = _crop_resize(img, k_crop, min_area)
  img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
  img = jnp.where(jax.random.bernoulli(k_pj, jitter_prob), _jitter(img, k_jit, jitter), img)
  gray = jnp.broadcast_to((img @ _GRAY)[..., None], img.shape)
  return jnp.where(jax.random.bernoulli(k_gray, 0.2), gray, img)


def simclr_view(images: jax.Array, keys: jax.Array, *, min_area: float = 0.2,
                jitter: float = 0.4, jitter_prob: float = 0.8) -> jax.Array:
  """One random SimCLR view of each image.

  Args:
    images: float32 [B, H, W, 3] in [0, 1].
    keys: [B] PRNG keys, one per image.
    min_area: smallest crop area (fraction of the image).
    jitter: strength of brightness / contrast / saturation jitter.
    jitter_prob: probability of the colour jitter.

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  return jax.vmap(lambda im, k: _view(im, k, min_area, jitter, jitter_prob))(images, keys)
