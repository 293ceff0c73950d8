"""ResNet (He et al. 2016, v1.5: stride on the 3x3 conv) returning the pooled feature
and the stage 2/3/4 feature maps.

Parameter names follow torchvision's (``conv1``, ``bn1``, ``layer1_0/conv1``,
``layer1_0/downsample_conv`` ...) so pretrained weights can be mapped one to one
(:mod:`jaxvars.backbones.resnet_import`).

Two styles, to match the two sources of pretrained weights:

* ``'torchvision'`` (default): v1.5 (stride on the 3x3 conv), convs without bias, BatchNorm
  eps 1e-5, input normalised with ImageNet's RGB mean and std.
* ``'keras'`` (``keras.applications.ResNet50``): v1 (stride on the first 1x1 conv), convs
  with bias, BatchNorm eps 1.001e-5, "caffe" input: RGB -> BGR, x * 255 minus the BGR mean
  (103.939, 116.779, 123.68), no scaling.

Input: float32 images in [0, 1], shape [B, H, W, 3] (NHWC), normalised inside the
model, so attacks work in pixel space.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvars import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
STYLES = ("torchvision", "keras")

ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  filters: int
  strides: int = 1
  conv_bias: bool = False
  stride_in_1x1: bool = False  # Unused: no 1x1 conv in the main path.
  dtype: jnp.dtype = jnp.float32  # Computation dtype of the convs (parameters stay float32).
  expansion = 1

  @nn.compact
  def __call__(self, x, *, norm):
    conv = functools.partial(layers.Conv, use_bias=self.conv_bias, dtype=self.dtype)
    y = conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    y = norm(name="bn2")(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), self.strides, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 x4 (ResNet-50/101); the stride sits on the 3x3 conv (v1.5) or on
  the first 1x1 conv (v1, ``stride_in_1x1``)."""
  filters: int
  strides: int = 1
  conv_bias: bool = False
  stride_in_1x1: bool = False
  dtype: jnp.dtype = jnp.float32  # Computation dtype of the convs (parameters stay float32).
  expansion = 4

  @nn.compact
  def __call__(self, x, *, norm):
    conv = functools.partial(layers.Conv, use_bias=self.conv_bias, dtype=self.dtype)
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = conv(self.filters, (1, 1), s1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), s3, padding=1, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = norm(name="bn3")(y)
    if x.shape[-1] != self.filters * 4 or self.strides != 1:
      x = conv(self.filters * 4, (1, 1), self.strides, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet feature extractor.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    width: channels of the first stage (64 in the standard nets).
    small_stem: 3x3 stride-1 stem without max-pool (for 32-64 px images) instead of
      the 7x7 stride-2 conv + 3x3 stride-2 max-pool.
    style: 'torchvision' or 'keras' (see module doc).
    dtype: computation dtype of every conv and BatchNorm (``config.dtype``; parameters stay
      float32, BatchNorm's statistics are float32, the input is normalised in float32
      then cast, and the returned maps are cast back to float32).

  Returns (``__call__(x, train=False)``), a dict of float32 arrays:
    'stage1' .. 'stage4': [B, h_s, w_s, C_s] outputs of each stage;
    'pooled': [B, C_4] global average of 'stage4' (the feature f_i of VBPR).
  """
  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  width: int = 64
  small_stem: bool = False
  style: str = "torchvision"
  dtype: jnp.dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.width * 8 * (4 if self.block == "bottleneck" else 1)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.style not in STYLES:
      raise ValueError(f"ResNet style {self.style!r} is not one of {STYLES}")
    keras = self.style == "keras"
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1.001e-5 if keras else 1e-5, dtype=self.dtype)
    block_cls = functools.partial(Bottleneck if self.block == "bottleneck" else BasicBlock,
                                  conv_bias=keras, stride_in_1x1=keras, dtype=self.dtype)
    if keras:
      x = x[..., ::-1] * 255.0 - jnp.asarray(CAFFE_BGR_MEAN, jnp.float32)
    else:
      x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    x = x.astype(self.dtype)
    if self.small_stem:
      x = layers.Conv(self.width, (3, 3), padding=1, use_bias=keras, name="conv1",
                      dtype=self.dtype)(x)
      x = nn.relu(norm(name="bn1")(x))
    else:
      x = layers.Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=keras, name="conv1",
                      dtype=self.dtype)(x)
      x = nn.relu(norm(name="bn1")(x))
      x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    out = {}
    for s, n_blocks in enumerate(self.stage_sizes):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        x = block_cls(self.width * 2**s, strides, name=f"layer{s + 1}_{b}")(x, norm=norm)
      out[f"stage{s + 1}"] = x.astype(jnp.float32)
    out["pooled"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return out


def make_resnet(arch: str, *, width: int = 64, small_stem: bool = False,
                style: str = "torchvision", dtype=jnp.float32) -> ResNet:
  """Builds ResNet-18/34/50/101 by name.

  Raises:
    ValueError: for an unknown ``arch`` or ``style``.
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {tuple(ARCHS)}")
  if style not in STYLES:
    raise ValueError(f"unknown ResNet style {style!r}; expected one of {STYLES}")
  stages, block = ARCHS[arch]
  return ResNet(stage_sizes=stages, block=block, width=width, small_stem=small_stem, style=style,
                dtype=dtype)


def _build(backbone_config, style: str, *, arch: str) -> ResNet:
  return make_resnet(arch, width=int(backbone_config.get("width", 64)),
                     small_stem=bool(backbone_config.get("small_stem", False)), style=style)


def _cache_suffix(backbone_config) -> str:
  width = int(backbone_config.get("width", 64))
  return (f"-w{width}" if width != 64 else "") + (
      "-small" if backbone_config.get("small_stem", False) else "")


def _validate(backbone_config) -> None:
  from jaxvars.errors import ConfigError
  width = backbone_config.get("width", 64)
  if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
    raise ConfigError(f"config.backbone.width={width!r} must be a positive integer")


def _register() -> None:
  from jaxvars.backbones import resnet_import
  from jaxvars.backbones.base import BACKBONES, BackboneEntry
  for arch in ARCHS:
    BACKBONES.register(arch, BackboneEntry(
        build=functools.partial(_build, arch=arch), convert=resnet_import.convert,
        style_of=resnet_import.style_of, cache_suffix=_cache_suffix, validate=_validate,
        default_style="torchvision"))


_register()
