"""``jpeg``: JPEG compression in front of the backbone (AIP's defence, Liu & Larson 2021,
section 7.2; Das et al. 2018 "Shield"; Guo et al. 2018).

Each photo is encoded and decoded as a JPEG of quality ``config.systems.jpeg_quality``
(PIL's encoder: libjpeg, 4:2:0 chroma subsampling at quality < 95) inside the jitted
pipeline through ``jax.pure_callback``. The codec is not differentiable: for attacks through
it, the backward pass is the identity (BPDA, Athalye et al. 2018). AIP sweeps the quality
over 90, 70, 50, 30 and 10 and gives no single default; 75 here (Guo et al.'s setting and
libjpeg's default). A tuple ``config.systems.jpeg_quality=(90, 70, 50, 30, 10)`` evaluates
one system per quality, ``jpeg_q90`` ... ``jpeg_q10`` (labels 'JPEG q90' ...; a
:class:`~jaxvars.defenses.systems.Sweep`); an int keeps the one system ``jpeg``.
"""

from __future__ import annotations

import functools
import io

import jax
import numpy as np
from PIL import Image

from jaxvars.defenses.systems import SYSTEMS, Sweep, System
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


def _at(quality: int):
  """The transform of JPEG at ``quality`` (static)."""
  return lambda models, params, images, keys, consts=None: jpeg_compress(images, quality)


# PIL documents qualities above 95 as "to be avoided" (100 turns parts of the compression off).
SWEEP = Sweep(field="jpeg_quality", tag="q", suffix="", label="JPEG q{}", at=_at, low=1, high=95)

SYSTEMS.register("jpeg", System(
    label="JPEG", needs=(),
    make=lambda config: _at(SWEEP.single(config, "jpeg")),
    description="JPEG encode + decode (PIL) before the backbone; BPDA (identity) backward",
    settings=lambda config: {"jpeg_quality": SWEEP.single(config, "jpeg")},
    validate=SWEEP.validate, host_callback=True, sweep=SWEEP))
