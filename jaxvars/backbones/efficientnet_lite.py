"""EfficientNet-Lite0/1/2 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML; the Lite variants of the TensorFlow TPU repository's
``models/official/efficientnet/lite`` release, March 2020) returning the backbone
interface of :mod:`jaxvars.backbones`.

EfficientNet-Lite is EfficientNet-B0's mobile inverted-bottleneck (MBConv) network made
friendly to quantisation and mobile accelerators:

* ReLU6 instead of swish, no squeeze-and-excitation;
* the stem (3x3 stride-2 conv, 32 channels) and the head (1x1 conv, 1280 channels) are
  never scaled, and the first and last block groups keep their repeats under depth
  scaling (the first group's input stays the stem's 32 channels);
* BatchNorm with epsilon 1e-3 (TF momentum 0.99), TF "SAME" padding (for stride 2 the
  extra pad row/column goes to the bottom/right: pad (p // 2, p - p // 2)).

Widths are ``round_filters(c * width)`` to multiples of 8, depths ``ceil(r * depth)``:

===================  =====  =====  ==========  ===========  ============
arch                 width  depth  resolution  blocks       params
===================  =====  =====  ==========  ===========  ============
efficientnet_lite0   1.0    1.0    224         16           4,652,008
efficientnet_lite1   1.0    1.1    240         21           5,416,680
efficientnet_lite2   1.1    1.2    260         21           6,092,072
===================  =====  =====  ==========  ===========  ============

(params: trainable parameters incl. the 1280 -> 1000 classifier; the BatchNorm running
statistics add 42,016 / 53,664 / 58,096 numbers.) The resolution is the one the
ImageNet weights were trained at; the network is fully convolutional and runs at any
size (the output side of every stride-2 layer is ``ceil(side / 2)``).

Module and parameter names mirror the EfficientNet-PyTorch state dict without its
leading underscores (``_blocks.3._depthwise_conv.weight`` -> ``blocks_3/depthwise_conv/
kernel``), so :mod:`jaxvars.backbones.efficientnet_import` maps them one to one.

Every convolution is ``jaxvars.layers.Conv`` (``flax.linen.Conv`` with a fast CPU
path for small maps; same parameters).

Input: float32 images in [0, 1], shape [B, H, W, 3] (NHWC, RGB), normalised inside the
model (``preprocess``), so attacks work in pixel space.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvars import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite's input normalisation (efficientnet_lite_builder.py: MEAN_RGB =
# 127, STDDEV_RGB = 128 on 0..255 pixels), i.e. about [-1, 1].
UNIT_MEAN = 127.0
UNIT_STD = 128.0
PREPROCESS = ("unit", "imagenet")
# The weights were converted from TF's checkpoints, trained on 'unit' inputs (TF's
# efficientnet_lite_builder.py: MEAN_RGB = 127, STDDEV_RGB = 128). On 200 H&M product photos
# (tests/test_efficientnet_lite.py) the ImageNet class is clothing/shoe/bag/accessory at
# top 1 for 76.5% with 'unit' against 66% with 'imagenet' (top 5: 93.5% against 92.5%).
DEFAULT_PREPROCESS = "unit"

STEM_FILTERS = 32
HEAD_FILTERS = 1280
DIVISOR = 8
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Flax's convention (= TF's): ra = m * ra + (1 - m) * batch.


class BlockGroup(NamedTuple):
  """One row of the EfficientNet-B0 block table (before width/depth scaling)."""
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int


# r1_k3_s1_e1_i32_o16, r2_k3_s2_e6_i16_o24, ..., r1_k3_s1_e6_i192_o320.
BLOCK_GROUPS = (
    BlockGroup(1, 3, 1, 1, 32, 16),
    BlockGroup(2, 3, 2, 6, 16, 24),
    BlockGroup(2, 5, 2, 6, 24, 40),
    BlockGroup(3, 3, 2, 6, 40, 80),
    BlockGroup(3, 5, 1, 6, 80, 112),
    BlockGroup(4, 5, 2, 6, 112, 192),
    BlockGroup(1, 3, 1, 6, 192, 320),
)
# Block groups after which the feature maps at strides 8 and 16 are taken (0-based):
# group 2 ends at stride 8 (40 channels in Lite0), group 4 at stride 16 (112 channels).
STAGE_GROUPS = {2: "stage2", 4: "stage3"}


class LiteSpec(NamedTuple):
  """Compound-scaling coefficients of one EfficientNet-Lite."""
  width: float
  depth: float
  resolution: int  # Training resolution of the ImageNet weights, px.


ARCHS = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260),
}


def round_filters(filters: int, width: float, divisor: int = DIVISOR) -> int:
  """Channels ``filters * width`` rounded to the nearest multiple of ``divisor`` (at least
  ``divisor``), one ``divisor`` more if rounding lost over 10% (the TF reference rule)."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  """Blocks in a group after depth scaling: ``ceil(repeats * depth)``."""
  return int(math.ceil(repeats * depth))


class BlockConfig(NamedTuple):
  """One MBConv block after scaling: its group (0-based) and its shape."""
  group: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int


def block_configs(width: float, depth: float) -> tuple[BlockConfig, ...]:
  """The scaled MBConv blocks of an EfficientNet-Lite, in order.

  Lite rules: the first and last groups keep their repeats; the first group's input is the
  (unscaled) 32-channel stem; only the group's first block strides and changes channels.
  """
  blocks = []
  last = len(BLOCK_GROUPS) - 1
  for g, group in enumerate(BLOCK_GROUPS):
    cin = round_filters(group.in_filters, width)
    cout = round_filters(group.out_filters, width)
    if g in (0, last):
      repeats = group.repeats
      if g == 0:
        cin = STEM_FILTERS
    else:
      repeats = round_repeats(group.repeats, depth)
    for r in range(repeats):
      blocks.append(BlockConfig(g, group.kernel, group.stride if r == 0 else 1, group.expand,
                                cin if r == 0 else cout, cout))
  return tuple(blocks)


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck without squeeze-excite (Sandler et al. 2018; EfficientNet-
  Lite): 1x1 expand conv + BN + ReLU6 (absent when ``expand == 1``), k x k depthwise conv
  (stride ``stride``, TF "SAME" padding) + BN + ReLU6, 1x1 projection + BN (linear), plus
  the input when the stride is 1 and the channels are unchanged.

  Attributes:
    kernel, stride, expand, in_filters, out_filters: as :class:`BlockConfig`.
    dtype: computation dtype.

  ``__call__(x, *, norm)``: x [B, H, W, in_filters] -> [B, ceil(H / s), ceil(W / s),
  out_filters]; ``norm`` builds the BatchNorm layers.
  """
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, norm):
    conv = functools.partial(layers.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    hidden = self.in_filters * self.expand
    y = x
    if self.expand != 1:
      y = conv(hidden, (1, 1), name="expand_conv")(y)
      y = jax.nn.relu6(norm(name="bn0")(y))
    y = conv(hidden, (self.kernel, self.kernel), self.stride, feature_group_count=hidden,
             name="depthwise_conv")(y)
    y = jax.nn.relu6(norm(name="bn1")(y))
    y = conv(self.out_filters, (1, 1), name="project_conv")(y)
    y = norm(name="bn2")(y)
    if self.stride == 1 and self.in_filters == self.out_filters:
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite backbone with its ImageNet classifier.

  Attributes:
    width: channel multiplier (1.0 for Lite0/1, 1.1 for Lite2).
    depth: repeat multiplier (1.0, 1.1, 1.2 for Lite0/1/2).
    num_classes: classifier outputs (1000 for the ImageNet weights).
    preprocess: input normalisation of the [0, 1] pixels: 'unit' ((x * 255 - 127) / 128,
      about [-1, 1]; what TF EfficientNet-Lite was trained with, the default) or
      'imagenet' ((x - mean) / std with ImageNet's RGB mean and std).
    dtype: computation dtype (parameters and the returned arrays stay float32).

  Returns (``__call__(x, train=False)``, x float32 [B, H, W, 3] in [0, 1]), a dict of
  float32 arrays:
    'stage2': [B, ceil(H / 8), ceil(W / 8), C] after block group 3 (C = 40 in Lite0/1,
      48 in Lite2);
    'stage3': [B, ceil(H / 16), ceil(W / 16), C] after block group 5 (112 / 120);
    'stage4': [B, ceil(H / 32), ceil(W / 32), 1280] the head's 1x1 conv + BN + ReLU6;
    'pooled': [B, 1280] mean of 'stage4' over H and W (the feature f_i of VBPR);
    'logits': [B, num_classes] the classifier on 'pooled' (no dropout).

  ``train=True`` only switches BatchNorm to batch statistics (and updates
  'batch_stats'); there is no dropout or stochastic depth.
  """
  width: float = 1.0
  depth: float = 1.0
  num_classes: int = 1000
  preprocess: str = DEFAULT_PREPROCESS
  dtype: jnp.dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Channels of 'stage4' and 'pooled' (1280: the head is never scaled)."""
    return HEAD_FILTERS

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.preprocess not in PREPROCESS:
      raise ValueError(f"EfficientNet-Lite preprocess {self.preprocess!r} is not one of "
                       f"{PREPROCESS}")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    conv = functools.partial(layers.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    x = jnp.asarray(x, jnp.float32)
    if self.preprocess == "unit":
      x = (x * 255.0 - UNIT_MEAN) / UNIT_STD
    else:
      x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    x = x.astype(self.dtype)
    x = conv(STEM_FILTERS, (3, 3), 2, name="conv_stem")(x)
    x = jax.nn.relu6(norm(name="bn0")(x))
    out = {}
    configs = block_configs(self.width, self.depth)
    for i, cfg in enumerate(configs):
      x = MBConvBlock(cfg.kernel, cfg.stride, cfg.expand, cfg.in_filters, cfg.out_filters,
                      dtype=self.dtype, name=f"blocks_{i}")(x, norm=norm)
      last_of_group = i + 1 == len(configs) or configs[i + 1].group != cfg.group
      if last_of_group and cfg.group in STAGE_GROUPS:
        out[STAGE_GROUPS[cfg.group]] = x.astype(jnp.float32)
    x = conv(HEAD_FILTERS, (1, 1), name="conv_head")(x)
    x = jax.nn.relu6(norm(name="bn1")(x))
    out["stage4"] = x.astype(jnp.float32)
    out["pooled"] = jnp.mean(out["stage4"], axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(out["pooled"])
    out["logits"] = logits.astype(jnp.float32)
    return out


def make_efficientnet_lite(arch: str, *, preprocess: str = DEFAULT_PREPROCESS,
                           num_classes: int = 1000, dtype=jnp.float32) -> EfficientNetLite:
  """Builds EfficientNet-Lite0/1/2 by name (see :data:`ARCHS`).

  Args:
    arch: 'efficientnet_lite0', 'efficientnet_lite1' or 'efficientnet_lite2'.
    preprocess: 'unit' (default) or 'imagenet'; see :class:`EfficientNetLite`.
    num_classes: classifier outputs (1000 for the ImageNet weights).
    dtype: computation dtype.

  Raises:
    ValueError: for an unknown ``arch`` or ``preprocess``.
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown EfficientNet-Lite arch {arch!r}; expected one of {tuple(ARCHS)}")
  if preprocess not in PREPROCESS:
    raise ValueError(f"unknown EfficientNet-Lite preprocess {preprocess!r}; expected one of "
                     f"{PREPROCESS}")
  spec = ARCHS[arch]
  return EfficientNetLite(width=spec.width, depth=spec.depth, num_classes=num_classes,
                          preprocess=preprocess, dtype=dtype)

