"""Image backbones (feature extractors) behind one interface, chosen by ``config.backbone.arch``.

Every backbone is a ``flax.linen.Module`` called as ``module.apply(variables, x, train=False)``
with ``x`` float32 [B, H, W, 3] in [0, 1] (pixel space: preprocessing happens inside the
model, so attacks perturb pixels) and returns a dict of float32 arrays:

* ``'pooled'``: [B, F], the global average of ``'stage4'`` (the item feature f_i of VBPR);
* ``'stage2'``, ``'stage3'``, ``'stage4'``: feature maps at strides 8, 16 and 32 (the
  perceptual loss's maps);
* ``'logits'``: [B, 1000] ImageNet logits, only for backbones with a classifier head.

and has the property ``feature_dim`` (F). A backbone with a ``dtype`` attribute (its compute
dtype; parameters float32, outputs cast back to float32) follows ``config.dtype``
(:func:`with_dtype`). An architecture is one module file that
registers a :class:`~jaxvars.backbones.base.BackboneEntry` in ``BACKBONES`` (every module
of this package is imported here, so registering is all a new file has to do).

``config.backbone.init``: ``'random'`` (initialised from the run's seed),
``'pretrained:<file or Orbax dir>'``, ``'pretrained:imagenet'`` (weights installed with a
pip package, where the architecture has one) or ``'self_supervised:<workdir of
configs/pretrain.py>'``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvars import fs
from jaxvars.backbones.base import BACKBONES, BackboneEntry
from jaxvars.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["BACKBONES", "BackboneEntry", "load_backbone", "build_backbone", "with_dtype",
           "PERCEPTUAL_MAPS"]

PERCEPTUAL_MAPS = ("stage2", "stage3", "stage4")  # Maps of the perceptual loss (paper 3.3).


def build_backbone(backbone_config):
  """The registered architecture ``backbone_config.arch``, randomly initialisable (its
  default weight layout)."""
  entry = BACKBONES.get(backbone_config.arch, "config.backbone.arch")
  return entry.build(backbone_config, entry.default_style)


def load_backbone(backbone_config, *, image_size: int, key: jax.Array):
  """The backbone of ``config.backbone`` and its variables, as ``backbone_config.init`` says.

  Args:
    backbone_config: ``config.backbone``.
    image_size: side of the square input images (pixels).
    key: PRNG key of a random initialisation.

  Returns:
    (module, {'params', 'batch_stats'}).

  Raises:
    ConfigError, DataError, CheckpointError: see :func:`jaxvars.backbones.weights.load_pretrained`.
  """
  from jaxvars.backbones import weights
  kind, _, path = backbone_config.init.partition(":")
  if kind == "self_supervised":  # A configs/pretrain.py workdir: its exported backbone.
    path, kind = fs.join(path, "backbone"), "pretrained"
  if kind == "pretrained":
    return weights.load_pretrained(path, arch=backbone_config.arch,
                                   backbone_config=backbone_config)
  module = build_backbone(backbone_config)
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return module, jax.jit(module.init)(key, image)


def with_dtype(module, dtype, *, arch: str = ""):
  """The backbone ``module`` computing in ``dtype`` (``config.dtype``: jnp.float32 or
  jnp.bfloat16): a clone with its ``dtype`` attribute set, the same parameters (float32)
  and outputs (float32 arrays). float32 returns ``module`` itself, unchanged.

  Raises:
    ConfigError: a non-float32 ``dtype`` for a backbone without a ``dtype`` attribute
      (``arch`` names it).
  """
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return module
  if "dtype" not in {f.name for f in dataclasses.fields(module)}:
    from jaxvars.errors import ConfigError
    raise ConfigError(f"config.dtype={jnp.dtype(dtype).name!r}: the backbone "
                      f"{arch or type(module).__name__!r} has no dtype attribute to compute in "
                      "it; use config.dtype='float32' (docs/extending.md, adding a backbone)")
  return module.clone(dtype=dtype)
