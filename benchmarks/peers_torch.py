"""The PyTorch side of benchmarks/peers.py: the reference nets of tests/ wrapped as
differentiable classifiers, a hand-written PGD loop, ART's PGD on a PyTorchClassifier,
and Cornac's VBPR. Imports no JAX and no jaxvars: peers.py hands over weights as a
{torch tensor name: numpy array in torch's layout} state dict.

  python benchmarks/peers.py --quick --repeats=1 --out=/tmp/peers_quick.json

Every function here takes NCHW float32 torch tensors in [0, 1] (or numpy arrays where ART
and Cornac want them) and runs on the CPU with ``torch.set_num_threads`` set by
:func:`setup`.
"""

import contextlib
import io
import os
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
if _TESTS not in sys.path:
  sys.path.insert(0, _TESTS)  # tests/torch_resnet.py, tests/torch_efficientnet.py.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def setup(threads: int) -> dict:
  """Sets torch's intra-op threads; returns the versions of torch, ART and Cornac."""
  torch.set_num_threads(threads)
  versions = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
  for name, module in (("art", "art"), ("cornac", "cornac")):
    try:
      versions[name] = __import__(module).__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal.
      versions[name] = f"unavailable: {type(e).__name__}: {e}"
  return versions


# ------------------------------------------------------------------------------------------
# Models.


class Classifier(nn.Module):
  """A reference backbone of tests/ as a differentiable classifier: NCHW [0, 1] images ->
  1000 logits (``forward``) or the pooled feature (``features``); eval mode.

  ResNet: ``TorchResNet`` of tests/torch_resnet.py (torchvision names; its ``fc`` is the head
  on the pooled feature). EfficientNet-Lite: ``TorchEfficientNetLite`` of tests/torch_efficientnet.py
  ('unit' or 'imagenet' preprocessing, as the jax model's; its ``_fc`` is the head). The
  references' own ``forward`` take and return numpy under ``no_grad``; the forward passes
  here are the same layers, in torch.
  """

  def __init__(self, arch: str, preprocess: str = "unit"):
    super().__init__()
    self.arch, self.preprocess = arch, preprocess
    if arch.startswith("resnet"):
      import torch_resnet
      self.net = torch_resnet.TorchResNet(arch)
      self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    elif arch.startswith("efficientnet_lite"):
      import torch_efficientnet
      self.net = torch_efficientnet.TorchEfficientNetLite(arch, preprocess=preprocess)
      self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    else:
      raise ValueError(f"no torch reference for {arch!r}")
    self.eval()

  def features(self, x):
    n = self.net
    if self.arch.startswith("resnet"):
      x = (x - self.mean) / self.std
      x = F.max_pool2d(torch.relu(n.bn1(n.conv1(x))), 3, 2, 1)
      for s in range(4):
        x = getattr(n, f"layer{s + 1}")(x)
      return x.mean(dim=(2, 3))
    x = (x * 255.0 - 127.0) / 128.0 if self.preprocess == "unit" else (x - self.mean) / self.std
    x = F.relu6(n._bn0(n._conv_stem(x)))
    for block in n._blocks:
      x = block(x)
    return F.relu6(n._bn1(n._conv_head(x))).mean(dim=(2, 3))

  def forward(self, x):
    head = self.net.fc if self.arch.startswith("resnet") else self.net._fc
    return head(self.features(x))


def build_classifier(arch: str, state: dict, preprocess: str = "unit") -> Classifier:
  """The reference net of ``arch`` with ``state`` ({name: numpy array}, torch layout and
  names, incl. the head) loaded; every parameter and buffer must be set (only
  ``num_batches_tracked`` may be missing).

  Raises:
    ImportError: the reference module of tests/ is missing or broken.
    KeyError: a tensor of the net missing from ``state``, or one in ``state`` it lacks.
  """
  model = Classifier(arch, preprocess)
  tensors = {f"net.{k}": torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")
             and k not in ("mean", "std")]
  if missing or unexpected:
    raise KeyError(f"{arch}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
  return model.eval()


def calibrate_norms(model: Classifier, x: torch.Tensor, seed: int = 0) -> dict:
  """Sets every BatchNorm's running statistics to those of the batch ``x`` (one forward in
  training mode with a cumulative average), then perturbs them as
  ``randomised`` of tests/torch_efficientnet.py does, so that in eval mode every layer's activations
  are O(1) and depend on the input (with a fresh init's mean 0 / var 1 a deep random net's
  output is swamped by the BatchNorm biases and hardly depends on its input).

  Returns:
    {torch name (without the ``net.`` prefix): numpy array} of every running_mean/var.
  """
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in norms:
      m.reset_running_stats()
      m.momentum = None  # Cumulative average: one batch sets the statistics.
    model.train()
    model.features(x)
    model.eval()
    for m in norms:
      m.running_mean.mul_(torch.empty(m.running_mean.shape).uniform_(0.8, 1.2, generator=gen))
      m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=gen))
      m.momentum = 0.1
  return {k.removeprefix("net."): v.numpy().copy() for k, v in model.state_dict().items()
          if k.endswith(("running_mean", "running_var"))}


def to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def feature_pass(model: Classifier, x: torch.Tensor) -> torch.Tensor:
  """Pooled features [B, F] under ``torch.no_grad``."""
  with torch.no_grad():
    return model.features(x)


# ------------------------------------------------------------------------------------------
# Attacks.


def pgd(model: Classifier, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, generator: torch.Generator) -> torch.Tensor:
  """L-inf PGD on the mean cross-entropy, written like ``jaxvars.attacks.pgd`` (eps and
  alpha in 1/255 units): uniform random start, ``steps`` sign steps with
  ``torch.autograd.grad``, keep-best over the batch loss (one more forward), 8-bit
  rounding and a last projection."""
  e, a = eps / 255.0, alpha / 255.0
  lo, hi = (x - e).clamp(min=0.0), (x + e).clamp(max=1.0)
  xt = torch.clamp(x + (torch.rand(x.shape, generator=generator) * 2.0 - 1.0) * e, lo, hi)
  best_x, best_loss = xt, -float("inf")
  for _ in range(steps):
    xt = xt.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xt), y)
    (g,) = torch.autograd.grad(loss, xt)
    if loss.item() > best_loss:
      best_x, best_loss = xt.detach(), loss.item()
    xt = torch.clamp(xt.detach() + a * g.sign(), lo, hi)
  with torch.no_grad():
    if F.cross_entropy(model(xt), y).item() < best_loss:
      xt = best_x
    return torch.clamp(torch.round(xt * 255.0) / 255.0, lo, hi)


def make_art_pgd(model: Classifier, *, image_size: int, batch_size: int, eps: float,
                 alpha: float, steps: int, seed: int = 0):
  """ART's ``ProjectedGradientDescent`` (its PyTorch implementation) on a
  ``PyTorchClassifier`` of ``model``: L-inf, eps/alpha in 1/255 units, ``steps``
  iterations, one random initialisation (``num_random_init=1``, ART's uniform start).

  Returns:
    attack(x NCHW float32 numpy, y int labels numpy) -> adversarial NCHW numpy.
  """
  from art.attacks.evasion import ProjectedGradientDescent
  from art.estimators.classification import PyTorchClassifier
  classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                                 input_shape=(3, image_size, image_size), nb_classes=1000,
                                 clip_values=(0.0, 1.0), device_type="cpu")
  attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps / 255.0,
                                    eps_step=alpha / 255.0, max_iter=steps,
                                    batch_size=batch_size, num_random_init=1, verbose=False)

  def run(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    np.random.seed(seed)  # ART draws its random start from numpy's global generator.
    return attack.generate(x=x, y=y)

  return run


# ------------------------------------------------------------------------------------------
# Cornac.


def cornac_vbpr(*, train_users: np.ndarray, train_items: np.ndarray, num_users: int,
                num_items: int, features: np.ndarray, k: int, k2: int, epochs: int,
                batch_size: int, lr: float, lambda_w: float, lambda_b: float, lambda_e: float,
                init_params: dict | None, seed: int):
  """Trains ``cornac.models.VBPR`` on the given training pairs and item features.

  The Cornac dataset maps raw id u -> index u and i -> index i (``global_uid_map`` and
  ``global_iid_map`` fixed in that order, all items included), so indices are jaxvars'.

  Returns:
    (model, fit seconds: ``model.fit`` alone, dataset building excluded).
  """
  import cornac
  triples = list(zip(train_users.tolist(), train_items.tolist(), [1.0] * len(train_users)))
  uid_map = OrderedDict((u, u) for u in range(num_users))
  iid_map = OrderedDict((i, i) for i in range(num_items))
  train_set = cornac.data.Dataset.build(triples, global_uid_map=uid_map, global_iid_map=iid_map,
                                        seed=seed)
  image = cornac.data.ImageModality(features=np.asarray(features, np.float32),
                                    ids=list(range(num_items)), normalized=False)
  image.build(id_map=train_set.iid_map)
  train_set.add_modalities(item_image=image)
  model = cornac.models.VBPR(k=k, k2=k2, n_epochs=epochs, batch_size=batch_size,
                             learning_rate=lr, lambda_w=lambda_w, lambda_b=lambda_b,
                             lambda_e=lambda_e, use_gpu=False, verbose=False,
                             init_params=None if init_params is None else dict(init_params),
                             seed=seed)
  t = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # "Optimization finished!" is printed always.
    model.fit(train_set)
  return model, time.perf_counter() - t


def cornac_candidate_scores(model, candidates: np.ndarray) -> np.ndarray:
  """``model.score(u, candidates[u])`` for every user u: float [U, C]."""
  return np.stack([np.asarray(model.score(u, candidates[u]), np.float64)
                   for u in range(len(candidates))])
