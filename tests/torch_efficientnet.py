"""A pure-PyTorch EfficientNet-Lite0/1/2 with EfficientNet-PyTorch's parameter names
(``_conv_stem``, ``_blocks.i._depthwise_conv`` ...), as an independent reference for the
Flax port (jaxvars/backbones/efficientnet_lite.py) and its weight import.

Written separately from the Flax model: the scaled block tables below are spelled out by
hand (not computed with the port's round_filters/round_repeats), padding is TF "SAME"
computed per call with F.pad, and the stage maps are taken by block index.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per arch: the blocks' groups as (repeats, kernel, stride, expand, in, out) after the Lite
# scaling rules (first/last group repeats fixed, stem 32 and head 1280 unscaled), worked out
# by hand from EfficientNet-B0's table: Lite1 depth 1.1 -> repeats ceil(1.1 r); Lite2 width
# 1.1 -> 16, 24, 48, 88, 120, 208, 352 channels and depth 1.2 -> ceil(1.2 r).
TABLES = {
    "efficientnet_lite0": [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                           (1, 3, 1, 6, 192, 320)],
    "efficientnet_lite1": [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40),
                           (4, 3, 2, 6, 40, 80), (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192),
                           (1, 3, 1, 6, 192, 320)],
    "efficientnet_lite2": [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48),
                           (4, 3, 2, 6, 48, 88), (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208),
                           (1, 3, 1, 6, 208, 352)],
}


class SameConv(nn.Conv2d):
  """Conv2d with TensorFlow's "SAME" padding: output ceil(in / stride), the odd pad
  row/column at the bottom/right."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                          reversed(self.stride)):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]  # F.pad order: W (left, right), H (top, bottom).
    return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-3)


class Block(nn.Module):
  def __init__(self, k, s, e, cin, cout):
    super().__init__()
    mid = cin * e
    self.residual = s == 1 and cin == cout
    if e != 1:
      self._expand_conv = SameConv(cin, mid, 1, bias=False)
      self._bn0 = _bn(mid)
    self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid, bias=False)
    self._bn1 = _bn(mid)
    self._project_conv = SameConv(mid, cout, 1, bias=False)
    self._bn2 = _bn(cout)

  def forward(self, x):
    y = x
    if hasattr(self, "_expand_conv"):
      y = F.relu6(self._bn0(self._expand_conv(y)))
    y = F.relu6(self._bn1(self._depthwise_conv(y)))
    y = self._bn2(self._project_conv(y))
    return y + x if self.residual else y


class TorchEfficientNetLite(nn.Module):
  """Eval-mode reference; ``forward`` takes float32 NHWC images in [0, 1] (numpy) and returns
  numpy 'stage2', 'stage3', 'stage4' (NHWC), 'pooled' and 'logits'."""

  def __init__(self, arch="efficientnet_lite0", preprocess="unit"):
    super().__init__()
    self.preprocess = preprocess
    self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
    self._bn0 = _bn(32)
    blocks, self.stage_ends = [], {}
    for g, (r, k, s, e, cin, cout) in enumerate(TABLES[arch]):
      for i in range(r):
        blocks.append(Block(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
      if g == 2:
        self.stage_ends[len(blocks) - 1] = "stage2"  # Stride 8.
      if g == 4:
        self.stage_ends[len(blocks) - 1] = "stage3"  # Stride 16.
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = SameConv(TABLES[arch][-1][-1], 1280, 1, bias=False)
    self._bn1 = _bn(1280)
    self._fc = nn.Linear(1280, 1000)

  @torch.no_grad()
  def forward(self, x_nhwc01):
    x = torch.as_tensor(np.asarray(x_nhwc01, np.float32)).permute(0, 3, 1, 2)
    if self.preprocess == "unit":
      x = (x * 255.0 - 127.0) / 128.0
    elif self.preprocess == "imagenet":
      x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
          IMAGENET_STD).view(1, 3, 1, 1)
    else:
      raise ValueError(self.preprocess)
    x = F.relu6(self._bn0(self._conv_stem(x)))
    out = {}
    for i, block in enumerate(self._blocks):
      x = block(x)
      if i in self.stage_ends:
        out[self.stage_ends[i]] = x.permute(0, 2, 3, 1).numpy()
    x = F.relu6(self._bn1(self._conv_head(x)))
    out["stage4"] = x.permute(0, 2, 3, 1).numpy()
    pooled = x.mean(dim=(2, 3))
    out["pooled"] = pooled.numpy()
    out["logits"] = self._fc(pooled).numpy()
    return out


def load(arch, state_dict, preprocess="unit"):
  """The reference with ``state_dict`` loaded strictly (no missing or extra tensors), in
  eval mode."""
  net = TorchEfficientNetLite(arch, preprocess)
  net.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
  return net.eval()


def randomised(arch="efficientnet_lite0", preprocess="unit", seed=0, size=64):
  """A reference net with random weights, in eval mode, whose BatchNorm statistics are those
  of a random batch (so every layer's activations are O(1) and input-dependent, not
  swamped by arbitrary running means), then perturbed, as are gammas, betas and fc bias."""
  torch.manual_seed(seed)
  net = TorchEfficientNetLite(arch, preprocess)
  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  for m in bns:
    m.momentum = None  # Cumulative average: one batch sets the statistics.
  net.train()
  x = np.random.default_rng(seed).random((8, size, size, 3), dtype=np.float32)
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.5, 1.5)
      m.bias.uniform_(-0.3, 0.3)
    net(x)
    for m in bns:
      m.running_mean.mul_(torch.empty_like(m.running_mean).uniform_(0.8, 1.2))
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
      m.momentum = 0.1
    net._fc.bias.uniform_(-0.5, 0.5)
  return net.eval()
