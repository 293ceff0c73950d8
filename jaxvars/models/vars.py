"""The visually-aware recommender with its defence, as one bundle of pure functions.

``VisualRecommender`` holds the flax modules (static, hashable) and composes them:
``features`` (frozen ResNet -> pooled -> normalised f_i), ``denoise`` (D, optionally
behind random resize + pad), ``embed`` (detector embedding z) and ``score_fn``
(VBPR with its parameters bound). Parameters are passed in explicitly:

* ``params = {'vbpr': ..., 'denoiser': ..., 'detector': {'head': ...}}`` (trainable, by stage);
* ``consts = {'backbone': {'params', 'batch_stats'}, 'stats': {'mean', 'std'},
  'features': [I, F] clean normalised item features}`` (never trained).

All models run in eval mode (BatchNorm running statistics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxvars.defenses import random_resize_pad
from jaxvars.models.denoiser import Denoiser
from jaxvars.models.detector import ProjectionHead
from jaxvars.models.resnet import ResNet
from jaxvars.models.vbpr import VBPR


def to_float(images_uint8: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] in 0..255 -> float32 in [0, 1]."""
  return images_uint8.astype(jnp.float32) / 255.0


def normalize_features(features: jax.Array, stats: dict, mode: str) -> jax.Array:
  """Normalises pooled features f [..., F] before VBPR.

  Args:
    stats: {'mean': [F], 'std': [F]} of the clean catalogue ('standardize').
    mode: 'standardize' ((f - mean) / std), 'l2' (unit norm) or 'none'.

  Raises:
    ValueError: unknown mode.
  """
  if mode == "standardize":
    return (features - stats["mean"]) / stats["std"]
  if mode == "l2":
    return features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-8)
  if mode == "none":
    return features
  raise ValueError(f"feature normalisation {mode!r} is not 'standardize', 'l2' or 'none'")


@dataclasses.dataclass(frozen=True)
class VisualRecommender:
  """ResNet -> VBPR, with the denoiser D and the detector head g in front.

  Attributes:
    backbone: frozen ResNet. vbpr: VBPR. denoiser: D. head: detector projection head.
    feature_norm: see :func:`normalize_features`.
    rand_min_scale: smallest scale of the random resize ("rand" defence).
    rand_pad: padding of "rand": 'zero' (Xie et al.) or 'border' (the image's border colour).
  """
  backbone: ResNet
  vbpr: VBPR
  denoiser: Denoiser
  head: ProjectionHead
  feature_norm: str = "standardize"
  rand_min_scale: float = 0.875
  rand_pad: str = "zero"

  def backbone_out(self, consts, images: jax.Array) -> dict:
    """ResNet outputs (stage maps, 'pooled') of float32 images [B, H, W, 3] in [0, 1]."""
    return self.backbone.apply(consts["backbone"], images, train=False)

  def normalize(self, consts, pooled: jax.Array) -> jax.Array:
    return normalize_features(pooled, consts["stats"], self.feature_norm)

  def features(self, consts, images: jax.Array) -> jax.Array:
    """Normalised item features f [B, F] of float32 images [B, H, W, 3]."""
    return self.normalize(consts, self.backbone_out(consts, images)["pooled"])

  def denoise(self, params, images: jax.Array, *, rand_key: jax.Array | None = None):
    """D(x), or D(random_resize_pad(x)) when ``rand_key`` is given ("rand")."""
    if rand_key is not None:
      images = random_resize_pad(images, rand_key, min_scale=self.rand_min_scale,
                                 pad=self.rand_pad)
    return self.denoiser.apply({"params": params["denoiser"]}, images)

  def embed_pooled(self, params, pooled: jax.Array) -> jax.Array:
    """Detector embeddings z [B, D] (unit norm) from pooled ResNet features [B, F]."""
    return self.head.apply({"params": params["detector"]["head"]}, pooled)

  def score_fn(self, vbpr_params):
    """(users, items, features) -> VBPR scores, with ``vbpr_params`` bound."""
    return functools.partial(self.vbpr.apply, {"params": vbpr_params})

  def detection_scores(self, params, consts, images: jax.Array) -> jax.Array:
    """Detector score ||z(x) - z(D(x))||_2 [B] of float32 images [B, H, W, 3]."""
    pooled = self.backbone_out(consts, jnp.concatenate([images, self.denoise(params, images)]))
    z = self.embed_pooled(params, pooled["pooled"])
    b = images.shape[0]
    return jnp.linalg.norm(z[:b] - z[b:], axis=-1)
