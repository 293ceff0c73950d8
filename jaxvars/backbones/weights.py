"""Reading weights files and loading converted pretrained backbones (cached with Orbax).

* :func:`read_torch_state_dict`: a PyTorch state dict (``.pth``/``.pt`` through
  ``torch.load(..., weights_only=True)``: no code in the file runs; needs torch) or a
  ``.safetensors`` file (no torch needed) -> {name: float32 numpy array}.
* :func:`read_keras_h5`: a Keras 2 weights file -> {layer: {weight: array}}.
* :func:`load_pretrained`: the registered backbone's module and its converted variables,
  converted once and cached with Orbax next to the file (``<file>.jaxvars-<arch>``; under
  ``~/.cache/jaxvars`` where that directory is read-only), or read from an Orbax directory
  given directly.
* :func:`write_safetensors`: the reverse of the reader, for moving weights to a machine
  without torch (``python -m jaxvars.convert``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars import checkpointing
from jaxvars.backbones.base import BACKBONES
from jaxvars.errors import ConfigError, DataError

IMAGENET = "imagenet"  # backbone.init='pretrained:imagenet': the weights a pip package installed.


def expected_variables(model):
  """ShapeDtypeStructs of a backbone's {'params', 'batch_stats'} (nothing is computed)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def keypath_names(keypath) -> tuple[str, ...]:
  """A pytree key path as a tuple of names: ('params', 'layer1_0', 'conv1', 'kernel')."""
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in keypath)


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


def write_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  """Writes {name: array} as a ``.safetensors`` file (atomically)."""
  from safetensors.numpy import save_file

  from jaxvars.atomic import atomic_path
  with atomic_path(path, ".safetensors") as tmp:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, tmp)


def resolve_source(source: str, arch: str) -> str:
  """``'imagenet'`` -> the weights file its registered pip package installed; else ``source``.

  Raises:
    ConfigError: the architecture has no installable ImageNet weights.
    DataError: the package is not installed (naming the install command).
  """
  if source != IMAGENET:
    return source
  entry = BACKBONES.get(arch, "config.backbone.arch")
  if entry.imagenet_weights is None:
    raise ConfigError(f"config.backbone.init='pretrained:{IMAGENET}': no ImageNet weights can be "
                      f"installed for {arch!r} here; pass pretrained:<path to a weights file>")
  return entry.imagenet_weights()


def cache_path(source: str, arch: str, suffix: str = "", *, user_cache: bool = False) -> str:
  """Where the converted weights of ``source`` are cached: ``<source>.jaxvars-<arch><suffix>``
  next to it, or under ``$XDG_CACHE_HOME/jaxvars`` (default ``~/.cache/jaxvars``) for a
  package's file (``user_cache``) or where the source's directory is read-only."""
  name = f"{os.path.basename(source)}.jaxvars-{arch}{suffix}"
  parent = os.path.dirname(os.path.abspath(source))
  if not user_cache and os.access(parent, os.W_OK):
    return os.path.join(parent, name)
  home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(home, "jaxvars", name)


def load_pretrained(source: str, *, arch: str, backbone_config):
  """A registered backbone built to match ``source`` and its converted variables.

  Args:
    source: a weights file the architecture's converter reads, ``'imagenet'`` (see
      :func:`resolve_source`), or an Orbax directory written by this function or by
      ``configs/pretrain.py``.
    arch: a registered architecture (``config.backbone.arch``).
    backbone_config: ``config.backbone`` (shape fields such as a ResNet's width).

  Returns:
    (module, {'params', 'batch_stats'}).

  Raises:
    DataError: a missing, unreadable or mismatched file (naming the first bad tensor).
    CheckpointError: an Orbax directory of another shape.
  """
  entry = BACKBONES.get(arch, "config.backbone.arch")
  from_package = source == IMAGENET
  source = resolve_source(source, arch)
  model = entry.build(backbone_config, entry.style_of(source))
  like = expected_variables(model)
  if os.path.isdir(source):
    return model, checkpointing.load_tree(source, like)
  if entry.convert is None:
    raise ConfigError(f"backbone {arch!r} has no weight import; pass an Orbax directory")
  cache = cache_path(source, arch, entry.cache_suffix(backbone_config), user_cache=from_package)
  if os.path.isdir(cache):
    return model, checkpointing.load_tree(cache, like)
  variables = entry.convert(source, model)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  checkpointing.save_tree(cache, variables)
  logging.info("converted %s to %s (cached with Orbax)", source, cache)
  return model, variables
