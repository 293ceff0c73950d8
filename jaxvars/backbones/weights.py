"""Reading weights files and loading converted pretrained backbones (cached with Orbax).

* :func:`read_torch_state_dict`: a PyTorch state dict (``.pth``/``.pt`` through
  ``torch.load(..., weights_only=True)``: no code in the file runs; needs torch) or a
  ``.safetensors`` file (no torch needed) -> {name: float32 numpy array}.
* :func:`read_keras_h5`: a Keras 2 weights file -> {layer: {weight: array}}.
* :func:`load_pretrained`: the registered backbone's module and its converted variables,
  converted once and cached with Orbax next to the file (``<file>.jaxvars-<arch>-<sha256 of
  the file, 16 digits>``; under ``~/.cache/jaxvars`` where that directory is read-only), or
  read from an Orbax directory given directly. The cache is keyed by the file's content, so
  weights replaced at the same path are converted afresh.
* :func:`file_sha256` / :func:`content_fingerprint`: the content hash of a weights file (read
  in chunks, remembered per size/mtime/ctime/inode in ``<cache dir>/<file>.jaxvars-sha256.json``
  so an unchanged file is not read again each run), what the stage records of
  :mod:`jaxvars.training.records` hold as ``weights``.
* :func:`write_safetensors`: the reverse of the reader, for moving weights to a machine
  without torch (``python -m jaxvars.convert``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars import atomic, checkpointing, fs
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

  A weights *file* on a non-local path (``gs://...``) is copied once into the user cache
  (:func:`remote_copy`) and the local copy returned: the converters (torch, safetensors,
  h5py) read local files. A non-local Orbax directory is returned as it is (Orbax reads
  it through epath).

  Raises:
    ConfigError: the architecture has no installable ImageNet weights.
    DataError: the package is not installed (naming the install command).
  """
  if source != IMAGENET:
    if not fs.is_local(source) and fs.isfile(source):
      return remote_copy(source)
    return source
  entry = BACKBONES.get(arch, "config.backbone.arch")
  if entry.imagenet_weights is None:
    raise ConfigError(f"config.backbone.init='pretrained:{IMAGENET}': no ImageNet weights can be "
                      f"installed for {arch!r} here; pass pretrained:<path to a weights file>")
  return entry.imagenet_weights()


def _user_cache() -> str:
  home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(home, "jaxvars")


def remote_copy(source: str) -> str:
  """A local copy of the non-local weights file ``source``:
  ``<user cache>/remote/<sha256 of the URI, size and mtime: 16 digits>/<file name>`` (see
  :func:`cache_dir`), downloaded through epath unless present (written atomically).

  Raises:
    DataError: naming ``source`` when it cannot be read.
  """
  try:
    size, mtime = fs.stat_signature(source)
    key = hashlib.sha256(f"{source}\t{size}\t{mtime}".encode()).hexdigest()[:16]
    local = os.path.join(_user_cache(), "remote", key, os.path.basename(fs.fspath(source)))
    if not os.path.isfile(local):
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with atomic.atomic_file(local, "wb", every_process=True) as out, \
          fs.open(source, "rb") as src:  # Each host's own cache.
        while chunk := src.read(_CHUNK):
          out.write(chunk)
      logging.info("copied %s to %s", source, local)
  except OSError as e:
    raise DataError(f"{source}: cannot read the weights file ({e.strerror or e})") from None
  return local


def cache_dir(source: str, *, user_cache: bool = False) -> str:
  """The directory of ``source``'s caches: next to it, or ``$XDG_CACHE_HOME/jaxvars``
  (default ``~/.cache/jaxvars``) for a package's file (``user_cache``) or where the source's
  directory is read-only."""
  parent = os.path.dirname(os.path.abspath(source))
  if not user_cache and os.access(parent, os.W_OK):
    return parent
  return _user_cache()


_CHUNK = 1 << 20
_SHA_MEMO: dict[str, tuple[list, str]] = {}  # abspath -> (stat key, sha256): this process.
SHA_MEMO_SUFFIX = ".jaxvars-sha256.json"


# A hash is remembered only for a file last changed this long before it was read: a change
# within the same coarse timestamp tick as the stat would not change the stat ("racy git").
_RACY_NS = 1_000_000_000


def _stat_key(path: str) -> list:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _settled(key: list, now_ns: int) -> bool:
  """Whether a file whose :func:`_stat_key` is ``key`` was last changed long enough before
  ``now_ns`` for that stat to identify its content."""
  return now_ns - max(key[1], key[2]) > _RACY_NS


def file_sha256(path: str, *, memo_dir: str | None = None) -> str:
  """sha256 (hex) of a file's bytes, read in 1 MiB chunks.

  Remembered while the file's size, mtime, ctime and inode stay the same: in this process,
  and with ``memo_dir`` also across runs in ``<memo_dir>/<file name>.jaxvars-sha256.json``
  (best effort: an unwritable directory only costs reading the file again). Replacing the
  file (a copy, ``os.replace``, an edit) changes its ctime or inode, so it is hashed again;
  a file changed less than a second before it is read is not remembered (a second change
  within the same timestamp tick would leave its stat as it was).

  Raises:
    OSError: the file cannot be read.
  """
  path = os.path.abspath(path)
  key = _stat_key(path)
  known = _SHA_MEMO.get(path)
  if known is not None and known[0] == key:
    return known[1]
  memo = os.path.join(memo_dir, os.path.basename(path) + SHA_MEMO_SUFFIX) if memo_dir else None
  if memo is not None:
    try:
      with open(memo) as f:
        entry = json.load(f)
      if (isinstance(entry, dict) and entry.get("path") == path and entry.get("stat") == key
          and isinstance(entry.get("sha256"), str)):
        _SHA_MEMO[path] = (key, entry["sha256"])
        return entry["sha256"]
    except (OSError, ValueError):
      pass
  started = time.time_ns()
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  digest = h.hexdigest()
  if _stat_key(path) != key or not _settled(key, started):
    return digest  # Changed while being read, or too recently to trust its stat.
  _SHA_MEMO[path] = (key, digest)
  if memo is not None:
    try:
      os.makedirs(memo_dir, exist_ok=True)
      atomic.write_json(memo, {"path": path, "stat": key, "sha256": digest},
                        every_process=True)
    except OSError as e:
      logging.debug("cannot remember the sha256 of %s in %s (%s)", path, memo, e)
  return digest


def tree_sha256(path: str) -> str:
  """sha256 (hex) of a directory tree's sorted (relative path, file sha256) pairs (an Orbax
  directory of weights); each file's hash is remembered in this process (:func:`file_sha256`).

  Raises:
    OSError: a file cannot be read.
  """
  lines = []
  if not fs.is_local(path):  # An Orbax directory on gs://: the same lines, read through epath.
    for rel, full in fs.tree_files(path):
      h = hashlib.sha256()
      with fs.open(full, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
          h.update(chunk)
      lines.append(f"{rel}\t{h.hexdigest()}")
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      lines.append(f"{os.path.relpath(full, path)}\t{file_sha256(full)}")
  return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def content_fingerprint(init: str, arch: str) -> str | None:
  """The content hash of the weights ``config.backbone.init`` loads: the sha256 of the
  weights file (``'pretrained:<file>'``, ``'pretrained:imagenet'``: the package's file),
  :func:`tree_sha256` of an Orbax directory (``'pretrained:<dir>'``,
  ``'self_supervised:<workdir>'``), None for ``'random'`` (the seed makes those) or a
  source that does not exist (:func:`load_pretrained` names it).

  Raises:
    ConfigError, DataError: ``'pretrained:imagenet'`` where no package provides the weights
      (see :func:`resolve_source`).
  """
  kind, _, path = init.partition(":")
  if kind == "self_supervised":
    path, kind = fs.join(path, "backbone"), "pretrained"
  if kind != "pretrained":
    return None
  from_package = path == IMAGENET
  source = resolve_source(path, arch)
  if fs.isdir(source):
    return tree_sha256(source)
  if not os.path.isfile(source):
    return None
  return file_sha256(source, memo_dir=cache_dir(source, user_cache=from_package))


def cache_path(source: str, arch: str, suffix: str = "", *, user_cache: bool = False,
               digest: str | None = None) -> str:
  """Where the converted weights of ``source`` are cached:
  ``<cache dir>/<file name>.jaxvars-<arch><suffix>-<sha256, 16 digits>`` (:func:`cache_dir`),
  keyed by the file's content (``digest``: its :func:`file_sha256`, computed if None), so
  other weights at the same path never read an old conversion."""
  directory = cache_dir(source, user_cache=user_cache)
  if digest is None:
    digest = file_sha256(source, memo_dir=directory)
  return os.path.join(directory,
                      f"{os.path.basename(source)}.jaxvars-{arch}{suffix}-{digest[:16]}")


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
  if fs.isdir(source):
    return model, checkpointing.load_tree(source, like)
  if entry.convert is None:
    raise ConfigError(f"backbone {arch!r} has no weight import; pass an Orbax directory")
  if not os.path.isfile(source):
    raise DataError(f"{source}: pretrained weights file is missing")
  cache = cache_path(source, arch, entry.cache_suffix(backbone_config), user_cache=from_package)
  if os.path.isdir(cache):
    return model, checkpointing.load_tree(cache, like)
  variables = entry.convert(source, model)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  checkpointing.save_tree(cache, variables)
  logging.info("converted %s to %s (cached with Orbax)", source, cache)
  return model, variables
