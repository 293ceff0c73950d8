"""``bit_depth``: colour bit-depth reduction in front of the backbone (feature squeezing, Xu
et al. 2018; AIP's second defence, Liu & Larson 2021, section 7.2).

Every channel value is rounded to one of ``2**b`` levels, ``b = config.systems.bit_depth``:
``x' = round(x * (2**b - 1)) / (2**b - 1)``. The rounding has a zero gradient almost
everywhere, so the backward pass is the identity (BPDA, Athalye et al. 2018). AIP sweeps
7 to 3 bits; 5 here (Xu et al.'s setting for ImageNet-sized photos). A tuple
``config.systems.bit_depth=(7, 6, 5, 4, 3)`` evaluates one system per depth,
``bit_depth_7bit`` ... ``bit_depth_3bit`` (labels 'BitDepth 7-bit' ...; a
:class:`~jaxvars.defenses.systems.Sweep`); an int keeps the one system ``bit_depth``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvars.defenses.systems import SYSTEMS, Sweep, System


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


def _at(bits: int):
  """The transform of bit-depth reduction to ``bits`` (static)."""
  return lambda models, params, images, keys, consts=None: reduce_bit_depth(images, bits)


SWEEP = Sweep(field="bit_depth", tag="", suffix="bit", label="BitDepth {}-bit", at=_at, low=1,
              high=8)

SYSTEMS.register("bit_depth", System(
    label="BitDepth", needs=(),
    make=lambda config: _at(SWEEP.single(config, "bit_depth")),
    description="colour depth reduced to config.systems.bit_depth bits per channel before the "
                "backbone; BPDA (identity) backward",
    settings=lambda config: {"bit_depth": SWEEP.single(config, "bit_depth")},
    validate=SWEEP.validate, sweep=SWEEP))
