"""Importing pretrained ResNet weights into :class:`jaxvars.backbones.resnet.ResNet`.

Sources:

* a torchvision ResNet-18/34/50/101 state dict, as ``.pth``/``.pt`` (read with
  ``torch.load(..., weights_only=True)``: no code in the file is ever executed; needs the
  optional ``torch`` extra) or ``.safetensors``; the model is built in 'torchvision' style;
* a Keras ``ResNet50``/``ResNet101`` weights file ``.h5`` (Keras 2 layout, as
  ``model.save_weights`` or ``keras.applications`` write it, with or without a top-level
  ``model_weights`` group); the model is built in 'keras' style (v1 blocks, conv biases,
  caffe preprocessing: see ``jaxvars/backbones/resnet.py``).

Conversion walks *our* model's expected tree, so a wrong or truncated file stops at the
first missing or mismatched tensor, named with its expected shape. Convolution kernels
are transposed from torch's OIHW to flax's HWIO; BatchNorm weight/bias/running_mean/
running_var (gamma/beta/moving_mean/moving_variance in Keras) become scale/bias and the
``batch_stats`` mean/var. Classifier weights (``fc.*``, ``predictions``) are ignored.

Converting once and caching with Orbax is :func:`jaxvars.backbones.weights.load_pretrained`'s job.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from jaxvars.backbones.weights import (expected_variables, keypath_names, read_keras_h5,
                                       read_torch_state_dict)
from jaxvars.errors import DataError

_BN_TORCH = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_BN_KERAS = {("params", "scale"): "gamma", ("params", "bias"): "beta",
             ("batch_stats", "mean"): "moving_mean", ("batch_stats", "var"): "moving_variance"}


def style_of(source: str) -> str:
  """'keras' for a .h5 file (or an Orbax cache of one), else 'torchvision'."""
  name = os.path.basename(os.path.normpath(source)).lower()
  return "keras" if ".h5" in name or ".hdf5" in name else "torchvision"


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, bool]:
  """Our leaf -> (torchvision tensor name, is_conv_kernel)."""
  *modules, leaf = path
  parts = []
  for m in modules:
    block = re.fullmatch(r"layer(\d+)_(\d+)", m)
    if block:
      parts += [f"layer{block.group(1)}", block.group(2)]
    elif m == "downsample_conv":
      parts.append("downsample.0")
    elif m == "downsample_bn":
      parts.append("downsample.1")
    else:
      parts.append(m)
  if leaf == "kernel":
    return ".".join(parts + ["weight"]), True
  if collection == "params" and leaf == "bias" and "conv" in modules[-1]:
    return ".".join(parts + ["bias"]), False
  return ".".join(parts + [_BN_TORCH[(collection, leaf)]]), False


def _keras_name(collection: str, path: tuple[str, ...]) -> tuple[str, str]:
  """Our leaf -> (Keras layer name, weight name)."""
  *modules, leaf = path
  if modules[0] in ("conv1", "bn1"):
    layer = "conv1_conv" if modules[0] == "conv1" else "conv1_bn"
  else:
    block = re.fullmatch(r"layer(\d+)_(\d+)", modules[0])
    stage, index = int(block.group(1)) + 1, int(block.group(2)) + 1
    sub = modules[1]
    k = "0" if sub.startswith("downsample") else sub[-1]
    kind = "conv" if "conv" in sub else "bn"
    layer = f"conv{stage}_block{index}_{k}_{kind}"
  if leaf == "kernel":
    return layer, "kernel"
  if collection == "params" and leaf == "bias" and layer.endswith("_conv"):
    return layer, "bias"
  return layer, _BN_KERAS[(collection, leaf)]


def convert(source: str, model) -> dict:
  """Converts a torchvision or Keras weights file into ``model``'s variables.

  Args:
    source: path to .pth / .pt / .safetensors (torchvision) or .h5 (Keras).
    model: a ResNet of the matching arch and style (see :func:`style_of`).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.

  Raises:
    DataError: naming the first missing or mismatched tensor and its expected shape.
  """
  expected = expected_variables(model)
  keras = model.style == "keras"
  if keras and model.block != "bottleneck":
    raise DataError(f"{source}: Keras weights exist only for ResNet-50/101 (bottleneck) nets")
  table = read_keras_h5(source) if keras else read_torch_state_dict(source)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  values = []
  for keypath, spec in leaves:
    collection, *path = keypath_names(keypath)
    path = tuple(path)
    if keras:
      layer, weight = _keras_name(collection, path)
      name = f"{layer}/{weight}"
      array = table.get(layer, {}).get(weight)
    else:
      name, is_kernel = _torch_name(collection, path)
      array = table.get(name)
      if array is not None and is_kernel:
        array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    where = f"{collection}/{'/'.join(path)}"
    if array is None:
      raise DataError(f"{source}: tensor {name!r} (for {where}) is missing; expected shape "
                      f"{tuple(spec.shape)}")
    if tuple(array.shape) != tuple(spec.shape):
      raise DataError(f"{source}: tensor {name!r} (for {where}) has shape {tuple(array.shape)}, "
                      f"expected {tuple(spec.shape)}" + (" after OIHW -> HWIO" if not keras and
                                                         len(spec.shape) == 4 else ""))
    values.append(np.asarray(array, np.float32))
  return jax.tree_util.tree_unflatten(treedef, values)
