"""``jpeg``: JPEG compression in front of the backbone (AIP's defence, Liu & Larson 2021,
section 7.2; Das et al. 2018 "Shield"; Guo et al. 2018).

Each photo is encoded and decoded as a JPEG of quality ``config.systems.jpeg_quality``
(PIL's encoder: libjpeg, 4:2:0 chroma subsampling at quality < 95) inside the jitted
pipeline through ``jax.pure_callback``. The codec is not differentiable: for attacks through
it, the backward pass is the identity (BPDA, Athalye et al. 2018). AIP sweeps the quality
over 90, 70, 50, 30 and 10 and gives no single default; 75 here (Guo et al.'s setting and
libjpeg's default).
"""

from __future__ import annotations

import functools
import io

import jax
import numpy as np
from PIL import Image

from jaxvars.defenses.systems import SYSTEMS, System
from jaxvars.errors import ConfigError
from jaxvars.pixels import to_float, to_uint8


def _roundtrip(images_uint8: np.ndarray, quality: int) -> np.ndarray:
  out = np.empty_like(images_uint8)
  for index in np.ndindex(images_uint8.shape[:-3]):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(images_uint8[index])).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
      out[index] = np.asarray(img.convert("RGB"))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def jpeg_compress(images: jax.Array, quality: int) -> jax.Array:
  """JPEG-compressed images (encode + decode with PIL), with an identity gradient (BPDA).

  Args:
    images: float32 [..., H, W, 3] in [0, 1] (rounded to 8 bits before encoding).
    quality: JPEG quality, 1..95 (static).

  Returns:
    float32 [..., H, W, 3] in [0, 1], on the 8-bit grid.
  """
  u8 = to_uint8(images)
  out = jax.pure_callback(functools.partial(_roundtrip, quality=int(quality)),
                          jax.ShapeDtypeStruct(u8.shape, u8.dtype), u8,
                          vmap_method="broadcast_all")
  return to_float(out)


def _fwd(images, quality):
  return jpeg_compress(images, quality), None


def _bwd(quality, _, g):
  return (g,)


jpeg_compress.defvjp(_fwd, _bwd)


def _validate(config) -> None:
  q = config.systems.get("jpeg_quality")
  if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 95:
    raise ConfigError(f"config.systems.jpeg_quality={q!r} must be an integer in [1, 95]")


SYSTEMS.register("jpeg", System(
    label="JPEG", needs=(),
    make=lambda config: (lambda models, params, images, keys, consts=None,
                                q=int(config.systems.jpeg_quality):
                         jpeg_compress(images, q)),
    description="JPEG encode + decode (PIL) before the backbone; BPDA (identity) backward",
    settings=lambda config: {"jpeg_quality": int(config.systems.jpeg_quality)},
    validate=_validate, host_callback=True))
