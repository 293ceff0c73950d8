"""Importing pretrained ResNet weights into :class:`jaxvars.models.resnet.ResNet`.

Sources:

* a torchvision ResNet-18/34/50/101 state dict, as ``.pth``/``.pt`` (read with
  ``torch.load(..., weights_only=True)``: no code in the file is ever executed; needs the
  optional ``torch`` extra) or ``.safetensors``; the model is built in 'torchvision' style;
* a Keras ``ResNet50``/``ResNet101`` weights file ``.h5`` (Keras 2 layout, as
  ``model.save_weights`` or ``keras.applications`` write it, with or without a top-level
  ``model_weights`` group); the model is built in 'keras' style (v1 blocks, conv biases,
  caffe preprocessing: see ``models/resnet.py``).

Conversion walks *our* model's expected tree, so a wrong or truncated file stops at the
first missing or mismatched tensor, named with its expected shape. Convolution kernels
are transposed from torch's OIHW to flax's HWIO; BatchNorm weight/bias/running_mean/
running_var (gamma/beta/moving_mean/moving_variance in Keras) become scale/bias and the
``batch_stats`` mean/var. Classifier weights (``fc.*``, ``predictions``) are ignored.

``load_pretrained`` converts once and caches the result with Orbax next to the source
(``<file>.jaxvars-<arch>``), or reads an Orbax directory given directly.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars import checkpointing
from jaxvars.errors import DataError
from jaxvars.models.resnet import ResNet, make_resnet

_BN_TORCH = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_BN_KERAS = {("params", "scale"): "gamma", ("params", "bias"): "beta",
             ("batch_stats", "mean"): "moving_mean", ("batch_stats", "var"): "moving_variance"}


def style_of(source: str) -> str:
  """'keras' for a .h5 file, else 'torchvision'."""
  return "keras" if source.lower().endswith((".h5", ".hdf5")) else "torchvision"


def expected_variables(model: ResNet):
  """ShapeDtypeStructs of the model's {'params', 'batch_stats'} (nothing is computed)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def _path(keypath) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in keypath)


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


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a torchvision checkpoint (.pth/.pt via torch.load(weights_only=True), or
  .safetensors) as float32 numpy arrays.

  Raises:
    DataError: missing, truncated or unsafe file (named); ImportError without torch for .pth.
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: pretrained weights file is missing")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError and others.
      raise DataError(f"{path}: cannot read safetensors file ({e})") from None
  else:
    try:
      import torch
    except ImportError:
      raise ImportError(f"reading {path} needs PyTorch: pip install 'jaxvars[torch]' (or "
                        "convert it to .safetensors)") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # Truncated zip, or an object weights_only refuses to unpickle.
      raise DataError(f"{path}: cannot load as a weights-only torch checkpoint ({e})") from None
    for key in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict):
      raise DataError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  return {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in tensors.items()}


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{layer name: {weight name: array}} of a Keras 2 weights file.

  Raises:
    DataError: missing or unreadable file (named).
  """
  import h5py
  if not os.path.exists(path):
    raise DataError(f"{path}: pretrained weights file is missing")
  out: dict[str, dict[str, np.ndarray]] = {}
  try:
    with h5py.File(path, "r") as f:
      root = f["model_weights"] if "model_weights" in f else f
      for layer in root:
        weights = {}

        def visit(name, obj, weights=weights):
          if isinstance(obj, h5py.Dataset):
            weights[name.split("/")[-1].split(":")[0]] = np.asarray(obj[()], np.float32)

        root[layer].visititems(visit)
        if weights:
          out[layer] = weights
  except OSError as e:
    raise DataError(f"{path}: cannot read HDF5 file ({e})") from None
  return out


def convert(source: str, model: ResNet) -> dict:
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
    collection, *path = _path(keypath)
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


def load_pretrained(source: str, *, arch: str, width: int = 64, small_stem: bool = False):
  """The ResNet and its converted variables, converting once and caching with Orbax.

  Args:
    source: a weights file (see :func:`convert`) or an Orbax directory written by this
      function (``<file>.jaxvars-<arch>``).

  Returns:
    (model, variables).
  """
  style = "keras" if ".h5" in os.path.basename(source).lower() else "torchvision"
  model = make_resnet(arch, width=width, small_stem=small_stem, style=style)
  like = expected_variables(model)
  if os.path.isdir(source):
    return model, checkpointing.load_tree(source, like)
  cache = f"{source}.jaxvars-{arch}" + (f"-w{width}" if width != 64 else "") + (
      "-small" if small_stem else "")
  if os.path.isdir(cache):
    return model, checkpointing.load_tree(cache, like)
  variables = convert(source, model)
  checkpointing.save_tree(cache, variables)
  logging.info("converted %s to %s (cached with Orbax)", source, cache)
  return model, variables
