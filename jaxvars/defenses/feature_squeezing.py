"""``feature_squeezing``: the detection baseline of Xu, Evans and Qi (NDSS 2018), "Feature
Squeezing: Detecting Adversarial Examples in Deep Neural Networks", section 3 ("joint
detection"), on the recommender instead of a classifier.

A squeezer ``s`` removes detail an attack relies on; a photo whose model output moves much
when squeezed is flagged. Xu et al. compare softmax vectors; a recommender has none, so the
model output here is the **visual embedding the recommender scores with**, ``v(x)``: VBPR's
projected feature ``E f(x)`` (``Recommender.visual_fn``), or ``f(x)`` itself for a recommender
whose visual space is its feature (AlexRank, DVBPR's ``Phi(x)``). The score is

  ``score(x) = max_{s in S} || v(x) - v(s(x)) ||_1``

over the squeezers ``S = {JPEG at config.detector.squeeze_jpeg_quality, bit-depth reduction
to config.detector.squeeze_bit_depth bits}`` (the project's two input transforms:
:func:`jaxvars.defenses.jpeg.jpeg_compress`, :func:`jaxvars.defenses.bit_depth.
reduce_bit_depth`). Xu et al. squeeze with bit depth, median and non-local-means smoothing;
JPEG stands in for the smoothing here (issue 37). A score above the threshold (the clean
calibration photos' (1 - ``config.detector.fpr``) quantile, as for the paper's detector) means
"attacked". No training.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxvars.defenses.baselines import DETECTION_BASELINES, Baseline
from jaxvars.defenses.bit_depth import reduce_bit_depth
from jaxvars.defenses.jpeg import jpeg_compress
from jaxvars.errors import ConfigError

SQUEEZERS = ("jpeg", "bit_depth")  # In the order of the rows of :func:`squeeze`.


def squeeze(images: jax.Array, *, jpeg_quality: int, bits: int) -> jax.Array:
  """The squeezed versions of ``images``, one per squeezer of :data:`SQUEEZERS`.

  Args:
    images: float32 [B, H, W, 3] in [0, 1].
    jpeg_quality: 1..95 (static). bits: 1..8 (static).

  Returns:
    float32 [2, B, H, W, 3] in [0, 1]: JPEG(x) (8-bit grid), then x at ``bits`` bits.
  """
  return jnp.stack([jpeg_compress(images, int(jpeg_quality)), reduce_bit_depth(images, int(bits))])


def squeezing_scores(embed: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                     jpeg_quality: int, bits: int) -> jax.Array:
  """Xu et al.'s joint-detection score ``max_s ||v(x) - v(s(x))||_1`` of each photo.

  Args:
    embed: float32 images [B, H, W, 3] in [0, 1] -> embeddings float32 [B, K] (the
      recommender's visual embedding, :meth:`jaxvars.models.Models.visual_embedding`). It
      runs on the photos and on each squeezed version as the same program (``lax.map``), so
      photo i and its squeezed version go through identical arithmetic: a squeezer that
      leaves a photo unchanged contributes exactly 0 (one batch of 3B could round row i and
      row B + i differently, ~1e-5 here).
    images: float32 [B, H, W, 3] in [0, 1].
    jpeg_quality, bits: the squeezers' settings (static).

  Returns:
    float32 [B], >= 0, in the embedding's units (L1 norm); exactly 0 where both squeezers
    leave the photo unchanged.
  """
  squeezed = squeeze(images, jpeg_quality=jpeg_quality, bits=bits)
  z = jax.lax.map(embed, jnp.concatenate([images[None], squeezed]))  # [3, B, K]
  return jnp.max(jnp.sum(jnp.abs(z[1:] - z[0]), axis=-1), axis=0)


def _settings(config) -> dict:
  return {"jpeg_quality": int(config.detector.squeeze_jpeg_quality),
          "bit_depth": int(config.detector.squeeze_bit_depth),
          "squeezers": list(SQUEEZERS), "distance": "L1", "embedding": "recommender visual (E f)"}


def _validate(config) -> None:
  for field, low, high in (("squeeze_jpeg_quality", 1, 95), ("squeeze_bit_depth", 1, 8)):
    value = config.detector.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise ConfigError(f"config.detector.{field}={value!r} must be an integer in [{low}, {high}]")


def _make(config):
  quality, bits = int(config.detector.squeeze_jpeg_quality), int(config.detector.squeeze_bit_depth)

  def score(models, params, consts, images):
    embed = lambda x: models.visual_embedding(params["recommender"], consts, x)
    return squeezing_scores(embed, images, jpeg_quality=quality, bits=bits)

  return score


DETECTION_BASELINES.register("feature_squeezing", Baseline(
    label="Feature squeezing", make=_make, settings=_settings, validate=_validate,
    needs_visual=True, host_callback=True,
    description="Xu et al. 2018: max over JPEG and bit-depth squeezing of the L1 distance of "
                "the recommender's visual embedding (E f) of x and of the squeezed x"))
