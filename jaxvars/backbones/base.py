"""The backbone registry and what an entry provides (see the package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from jaxvars.registry import Registry

BACKBONES = Registry("backbone")


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
  """How to build, and where to get weights for, one registered architecture.

  Attributes:
    build: ``(backbone_config, style) -> flax Module`` following the backbone interface;
      ``style`` names the weight layout the net must match ('torchvision', 'keras', ...).
    convert: ``(source file, module) -> {'params', 'batch_stats'}`` of numpy arrays, or None
      when no pretrained weights can be imported.
    style_of: ``source file -> style`` (the layout of a weights file).
    cache_suffix: ``backbone_config -> str`` appended to the cache name of converted
      weights (shape-changing fields such as a ResNet's width).
    imagenet_weights: ``() -> path`` of ImageNet weights installed with a pip package
      (``backbone.init='pretrained:imagenet'``), or None.
    validate: ``backbone_config -> None``, raising ConfigError for a bad field of its own.
    default_style: the style of a randomly initialised net.
  """
  build: Callable[..., nn.Module]
  convert: Callable[[str, nn.Module], dict] | None = None
  style_of: Callable[[str], str] = lambda source: "default"
  cache_suffix: Callable[..., str] = lambda backbone_config: ""
  imagenet_weights: Callable[[], str] | None = None
  validate: Callable[..., None] = lambda backbone_config: None
  default_style: str = "default"
