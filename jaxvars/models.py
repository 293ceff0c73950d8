"""The models of a run composed as one bundle of pure functions.

``Models`` holds the flax modules (static, hashable) and composes them: ``features``
(frozen backbone -> pooled -> normalised f_i), ``denoise`` (D, optionally behind random
resize + pad), ``embed_pooled`` (detector embedding z), ``detection_scores`` and the
recommender. Parameters are passed in explicitly:

* ``params = {'recommender': ..., 'denoiser': ..., 'detector': {'head': ...[, 'encoder':
  ...]}}`` (trainable, by stage: :data:`PARAM_GROUPS`; the detector's own copy of the
  backbone's weights when ``detector_encoder``);
* ``consts = {'backbone': {'params', 'batch_stats'}, 'stats': {'mean', 'std'},
  'features': [I, F] clean normalised item features}`` (never trained); for a recommender
  that embeds the photos with its own network (DVBPR), also its trained parameters under
  ``ENCODER_CONSTS``, and ``features`` its embedding of the clean photos
  (:func:`jaxvars.experiment.recommender_consts`).

All models run in eval mode (BatchNorm running statistics).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import AttackContext
from jaxvars.defenses.denoiser import Denoiser
from jaxvars.defenses.detector import ProjectionHead, detection_score
from jaxvars.defenses.transforms import random_resize_pad
from jaxvars.features import normalize_features
from jaxvars.recommenders import Recommender
from jaxvars.recommenders.base import ENCODER_CONSTS

PARAM_GROUPS = ("recommender", "denoiser", "detector")  # Top-level groups of ``params``.
# config.dtype: the compute dtype of the backbone, the denoiser and the detector head. Their
# parameters, their outputs, the losses, the recommender and the attacked photos stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The jnp dtype of a ``config.dtype`` name ('float32' | 'bfloat16').

  Raises:
    ConfigError: another name (the message names config.dtype and the allowed values).
  """
  if name not in COMPUTE_DTYPES:
    from jaxvars.errors import ConfigError
    raise ConfigError(f"config.dtype={name!r} is not one of {tuple(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Models:
  """Backbone -> recommender, with the denoiser D and the detector head g in front.

  Attributes:
    backbone: frozen backbone (see :mod:`jaxvars.backbones`). recommender: the Recommender.
    denoiser: D. head: detector projection head.
    feature_norm: see :func:`jaxvars.features.normalize_features`.
    rand_min_scale: smallest scale of the random resize ("rand" defence).
    rand_pad: padding of "rand": 'zero' (Xie et al.) or 'border' (the image's border colour).
    detector_encoder: the detector embeds through its own trainable copy of the backbone
      (``params['detector']['encoder']``, the paper's setting) instead of the frozen one.
    dtype: the name of the compute dtype the backbone, denoiser and head were built with
      (``config.dtype``, :data:`COMPUTE_DTYPES`); informational (the attack cache's
      fingerprint reads it): the modules carry their own ``dtype``.
  """
  backbone: nn.Module
  recommender: Recommender
  denoiser: Denoiser
  head: ProjectionHead
  feature_norm: str = "standardize"
  rand_min_scale: float = 0.875
  rand_pad: str = "zero"
  detector_encoder: bool = False
  dtype: str = "float32"

  def backbone_out(self, consts, images: jax.Array) -> dict:
    """Backbone outputs (stage maps, 'pooled', ...) of float32 images [B, H, W, 3] in [0, 1]."""
    return self.backbone.apply(consts["backbone"], images, train=False)

  def normalize(self, consts, pooled: jax.Array) -> jax.Array:
    """Normalised item features f [B, F] from pooled backbone features [B, F]."""
    return normalize_features(pooled, consts["stats"], self.feature_norm)

  def features(self, consts, images: jax.Array) -> jax.Array:
    """The recommender's item features f [B, F] of float32 images [B, H, W, 3] in [0, 1]:
    the frozen backbone's normalised pooled features, or for a recommender that reads the
    photos itself (DVBPR) its own network's embedding with its trained parameters
    ``consts[ENCODER_CONSTS]`` (:func:`jaxvars.experiment.recommender_consts`)."""
    if self.recommender.reads_images:
      return self._encode(consts, images)
    return self.normalize(consts, self.backbone_out(consts, images)["pooled"])

  def features_from(self, consts, out: dict, images: jax.Array) -> jax.Array:
    """:meth:`features` of ``images`` where their backbone outputs ``out`` (of
    :meth:`backbone_out`) are already computed: normalised ``out['pooled']``, or the
    recommender's own embedding of ``images``."""
    if self.recommender.reads_images:
      return self._encode(consts, images)
    return self.normalize(consts, out["pooled"])

  def _encode(self, consts, images):
    if ENCODER_CONSTS not in consts:
      raise KeyError(f"recommender {self.recommender.name!r} embeds photos with its own "
                     f"network, but consts has no {ENCODER_CONSTS!r} (its trained parameters: "
                     "jaxvars.experiment.recommender_consts)")
    return self.recommender.encode(consts[ENCODER_CONSTS], images)

  def rand(self, images: jax.Array, keys: jax.Array, *, pad: str | None = None) -> jax.Array:
    """The random resize + pad (Xie et al. 2018) of float32 images [B, H, W, 3], one draw
    per image from its key (``keys`` [B]), so an item's transform does not depend on its
    batch; ``pad`` defaults to ``rand_pad``."""
    pad = pad or self.rand_pad
    return jax.vmap(lambda img, k: random_resize_pad(img[None], k, min_scale=self.rand_min_scale,
                                                     pad=pad)[0])(images, keys)

  def denoise(self, params, images: jax.Array):
    """D(x) of float32 images [B, H, W, 3] in [0, 1]."""
    return self.denoiser.apply({"params": params["denoiser"]}, images)

  def embed_pooled(self, params, pooled: jax.Array) -> jax.Array:
    """Detector embeddings z [B, D] (unit norm) from the encoder's pooled features [B, F]."""
    return self.head.apply({"params": params["detector"]["head"]}, pooled)

  def detector_pooled(self, params, consts, images: jax.Array, *, frozen_pooled=None):
    """The detector encoder's pooled features [B, F] of images [B, H, W, 3]: the frozen
    backbone's (``frozen_pooled`` when already computed) or, with ``detector_encoder``, its
    own trainable copy's (BatchNorm statistics of the frozen backbone, eval mode)."""
    if not self.detector_encoder:
      if frozen_pooled is not None:
        return frozen_pooled
      return self.backbone_out(consts, images)["pooled"]
    variables = {"params": params["detector"]["encoder"],
                 "batch_stats": consts["backbone"]["batch_stats"]}
    return self.backbone.apply(variables, images, train=False)["pooled"]

  def embed(self, params, consts, images: jax.Array) -> jax.Array:
    """Detector embeddings z [B, D] of float32 images [B, H, W, 3]."""
    return self.embed_pooled(params, self.detector_pooled(params, consts, images))

  def visual_embedding(self, rec_params, consts, images: jax.Array) -> jax.Array:
    """The recommender's visual embedding float32 [B, K] of float32 images [B, H, W, 3] in
    [0, 1]: what its score reads of a photo, ``visual_fn(f)`` (VBPR: E f, K = its factors)
    where the recommender has one, else the item features f [B, F] themselves (AlexRank's
    visual space, DVBPR's Phi(x)). Used by feature squeezing
    (:mod:`jaxvars.defenses.feature_squeezing`)."""
    f = self.features(consts, images)
    visual = self.recommender.visual_fn(rec_params)
    return f if visual is None else visual(f)

  def score_fn(self, rec_params):
    """(users, items, features) -> recommender scores, with ``rec_params`` bound."""
    return self.recommender.score_fn(rec_params)

  def detection_scores(self, params, consts, images: jax.Array) -> jax.Array:
    """Detector score ||z(x) - z(D(x))||_2 [B] of float32 images [B, H, W, 3]."""
    z = self.embed(params, consts, jnp.concatenate([images, self.denoise(params, images)]))
    b = images.shape[0]
    return detection_score(z[:b], z[b:])

  def attack_context(self, rec_params, consts, items, triplets=None, *,
                     pipeline=None) -> AttackContext:
    """The context of an attack objective on a batch of item photos (models frozen).

    Args:
      rec_params: the attacked recommender's parameters. consts: as the module docstring.
      items: int32 [B]. triplets: ``item_triplets`` of ``items`` (or None).
      pipeline: images -> images in front of the backbone (a defence the attacker
        differentiates through); None = the plain backbone.

    The context's ``table`` is the clean table ``consts['features']``; a white-box attack
    on a defended system's deployed table replaces it (:func:`jaxvars.attacks.whitebox.
    attack_loss`, ``config.attack.whitebox_table``).
    """
    rec_params = jax.lax.stop_gradient(rec_params)
    pipeline = pipeline or (lambda x: x)
    features = lambda x: self.features(consts, pipeline(x))
    logits = lambda x: self.backbone_out(consts, pipeline(x)).get("logits")
    return AttackContext(features=features, score_fn=self.score_fn(rec_params),
                         visual_fn=self.recommender.visual_fn(rec_params), items=items,
                         table=consts["features"], triplets=triplets, logits=logits)
