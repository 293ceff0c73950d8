"""``bit_depth``: colour bit-depth reduction in front of the backbone (feature squeezing, Xu
et al. 2018; AIP's second defence, Liu & Larson 2021, section 7.2).

Every channel value is rounded to one of ``2**b`` levels, ``b = config.systems.bit_depth``:
``x' = round(x * (2**b - 1)) / (2**b - 1)``. The rounding has a zero gradient almost
everywhere, so the backward pass is the identity (BPDA, Athalye et al. 2018). AIP sweeps
7 to 3 bits; 5 here (Xu et al.'s setting for ImageNet-sized photos).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvars.defenses.systems import SYSTEMS, System
from jaxvars.errors import ConfigError


def reduce_bit_depth(images: jax.Array, bits: int) -> jax.Array:
  """Images quantised to ``bits`` bits per channel, with an identity gradient (BPDA).

  Args:
    images: float32 [..., H, W, 3] in [0, 1].
    bits: 1..8 (static).

  Returns:
    float32, same shape, values k / (2**bits - 1).
  """
  levels = float(2 ** int(bits) - 1)
  squeezed = jnp.round(images * levels) / levels
  return images + jax.lax.stop_gradient(squeezed - images)


def _validate(config) -> None:
  b = config.systems.get("bit_depth")
  if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
    raise ConfigError(f"config.systems.bit_depth={b!r} must be an integer in [1, 8]")


SYSTEMS.register("bit_depth", System(
    label="BitDepth", needs=(),
    make=lambda config: (lambda models, params, images, keys, consts=None,
                                b=int(config.systems.bit_depth):
                         reduce_bit_depth(images, b)),
    description="colour depth reduced to config.systems.bit_depth bits per channel before the "
                "backbone; BPDA (identity) backward",
    settings=lambda config: {"bit_depth": int(config.systems.bit_depth)},
    validate=_validate))
