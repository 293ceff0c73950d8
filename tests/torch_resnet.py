"""A pure-PyTorch ResNet with torchvision's parameter names (torchvision has no CPU wheel
here), plus a Keras-style variant, as an independent reference for weight conversion."""

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, c, stride, keras):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=keras)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=keras)
    self.bn2 = nn.BatchNorm2d(c)
    self.downsample = None
    if stride != 1 or cin != c:
      self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=keras), nn.BatchNorm2d(c))

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottle(nn.Module):
  expansion = 4

  def __init__(self, cin, c, stride, keras):
    super().__init__()
    s1, s3 = (stride, 1) if keras else (1, stride)
    self.conv1 = nn.Conv2d(cin, c, 1, s1, bias=keras)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, s3, 1, bias=keras)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=keras)
    self.bn3 = nn.BatchNorm2d(4 * c)
    self.downsample = None
    if stride != 1 or cin != 4 * c:
      self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * c, 1, stride, bias=keras),
                                      nn.BatchNorm2d(4 * c))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  def __init__(self, arch="resnet18", keras=False):
    super().__init__()
    sizes, block = {"resnet18": ((2, 2, 2, 2), Basic), "resnet50": ((3, 4, 6, 3), Bottle)}[arch]
    self.keras = keras
    eps = 1.001e-5 if keras else 1e-5
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=keras)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for s, n in enumerate(sizes):
      blocks = []
      for b in range(n):
        blocks.append(block(cin, 64 * 2**s, 2 if (s > 0 and b == 0) else 1, keras))
        cin = 64 * 2**s * block.expansion
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, 1000)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eps = eps

  def forward(self, x_nhwc01):
    x = torch.as_tensor(x_nhwc01).permute(0, 3, 1, 2)
    if self.keras:
      x = x.flip(1) * 255.0 - torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    else:
      x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
          1, 3, 1, 1)
    x = torch.relu(self.bn1(self.conv1(x)))
    x = nn.functional.max_pool2d(x, 3, 2, 1)
    out = {}
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
      out[f"stage{s + 1}"] = x.permute(0, 2, 3, 1).detach().numpy()
    out["pooled"] = x.mean(dim=(2, 3)).detach().numpy()
    return out


def randomised(arch, keras=False, seed=0):
  """A reference net with random weights and non-trivial BatchNorm statistics, in eval mode."""
  torch.manual_seed(seed)
  net = TorchResNet(arch, keras)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.2, 0.8)   # Small gammas keep the deep nets' activations O(1).
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.8, 1.5)
      if isinstance(m, nn.Conv2d) and m.bias is not None:
        m.bias.uniform_(-0.1, 0.1)
  return net.eval()


def save_keras_h5(net, path, *, model_weights_group=True):
  """Writes ``net``'s weights in Keras 2's ResNet50 weights layout (kernels HWIO)."""
  import h5py
  layers = {}
  layers["conv1_conv"] = net.conv1
  layers["conv1_bn"] = net.bn1
  for s in range(4):
    for b, block in enumerate(getattr(net, f"layer{s + 1}")):
      p = f"conv{s + 2}_block{b + 1}_"
      for k in (1, 2, 3):
        layers[f"{p}{k}_conv"] = getattr(block, f"conv{k}")
        layers[f"{p}{k}_bn"] = getattr(block, f"bn{k}")
      if block.downsample is not None:
        layers[f"{p}0_conv"], layers[f"{p}0_bn"] = block.downsample[0], block.downsample[1]
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if model_weights_group else f
    root.attrs["layer_names"] = np.array([n.encode() for n in layers])
    for name, m in layers.items():
      g = root.create_group(name).create_group(name)
      if isinstance(m, nn.Conv2d):
        g["kernel:0"] = m.weight.detach().numpy().transpose(2, 3, 1, 0)
        g["bias:0"] = m.bias.detach().numpy()
      else:
        for key, t in (("gamma", m.weight), ("beta", m.bias), ("moving_mean", m.running_mean),
                       ("moving_variance", m.running_var)):
          g[f"{key}:0"] = t.detach().numpy()
