"""File operations on a run's paths: local paths through ``os``, all others (``gs://``,
``s3://``, ...) through :class:`etils.epath.Path`.

Every path of a workdir or a data directory goes through these functions (or through
:mod:`jaxvars.atomic` for writes and :mod:`jaxvars.locking` for the workdir lock). A path
may be a ``str``, a ``pathlib.Path`` or an ``epath.Path``; :func:`fspath` turns any of them
into the string the rest of jaxvars passes around (``'gs://bucket/run'`` for a GCS path:
``os.path.join`` and f-strings work on it unchanged, since epath's URIs are POSIX paths).

A local path (:func:`is_local`: no ``<scheme>://``) keeps the ``os`` calls jaxvars made
before epath: the same files, bytes, modes and error messages, and the symlink checks of
:mod:`jaxvars.atomic` and :mod:`jaxvars.locking`, which need file descriptors that epath
does not give. Any other path is opened through ``epath.Path``, whose backend for
``gs://`` is TensorFlow's ``tf.io.gfile`` where ``tensorflow`` is installed, else fsspec's
``gcsfs`` (etils 1.15: ``etils/epath/gpath.py``); jaxvars installs neither.

Readers of whole files (:func:`np_load`, :func:`read_bytes`) read a non-local file into
memory first: numpy's ``.npz`` reader and PIL need seekable file objects, and a memory map
of a remote object is not possible.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import posixpath
import shutil
from typing import Union

import numpy as np
from etils import epath

PathLike = Union[str, os.PathLike]


def fspath(path: PathLike) -> str:
  """The string of ``path`` (an ``epath.Path`` of ``gs://b/x`` gives ``'gs://b/x'``)."""
  return os.fspath(path)


EPATH_ALL_ENV = "JAXVARS_EPATH_ALL"


def is_local(path: PathLike) -> bool:
  """Whether ``path`` is a path of this machine's file system (no ``<scheme>://``).

  With the environment variable ``JAXVARS_EPATH_ALL=1`` every path counts as non-local, so
  local files go through the epath code paths too (tests/test_paths.py; a way to check a
  ``gs://`` setup's code paths on a local disk)."""
  if os.environ.get(EPATH_ALL_ENV, "") == "1":
    return False
  return "://" not in os.fspath(path)


def has_scheme(path: PathLike) -> bool:
  """Whether ``path`` is a URI (``gs://...``): what :func:`join`, :func:`abspath` and
  :func:`expand` leave to epath's POSIX rules (``JAXVARS_EPATH_ALL`` does not change them)."""
  return "://" in os.fspath(path)


# The packages epath opens a scheme with (etils 1.15: tf.io.gfile where tensorflow is
# installed, else fsspec's filesystem of that scheme), the first named in the message.
_CLIENTS = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow"),
            "az": ("adlfs",), "hf": ("huggingface_hub",)}
_CHECKED: set[str] = set()


def _check_client(path: str) -> None:
  """Raises ConfigError naming ``path`` and the package to install where no client of its
  scheme is installed (instead of an ImportError deep inside epath)."""
  scheme = path.split("://", 1)[0] if "://" in path else None
  if scheme is None or scheme in _CHECKED:
    return
  import importlib.util
  from jaxvars.errors import ConfigError
  clients = _CLIENTS.get(scheme)
  if clients is None:
    known = ", ".join(f"{s}://" for s in _CLIENTS)
    raise ConfigError(f"{path}: jaxvars opens local paths and {known} paths (etils.epath), "
                      f"not {scheme}://")
  if not any(importlib.util.find_spec(c) for c in clients):
    raise ConfigError(f"{path}: {scheme}:// paths need a client that etils.epath uses: pip "
                      f"install {' or '.join(clients)} (with its credentials set up)")
  _CHECKED.add(scheme)


def as_path(path: PathLike):
  """``path`` as an :class:`etils.epath.Path`.

  Raises:
    ConfigError: a URI whose scheme epath cannot open here (no client installed).
  """
  _check_client(os.fspath(path))
  return epath.Path(path)


def join(path: PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths, ``posixpath.join`` for URIs (a string either way)."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if has_scheme(path) else os.path.join(path, *parts)


def abspath(path: PathLike) -> str:
  """The absolute form of a local path (``os.path.abspath``); a URI unchanged."""
  path = os.fspath(path)
  return path if has_scheme(path) else os.path.abspath(path)


def expand(path: PathLike) -> str:
  """``~`` expanded and made absolute for a local path; a URI unchanged."""
  path = os.fspath(path)
  return path if has_scheme(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: PathLike) -> bool:
  if is_local(path):
    return os.path.exists(path)
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  if is_local(path):
    return os.path.isdir(path)
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  if is_local(path):
    return os.path.isfile(path)
  p = as_path(path)
  return p.exists() and not p.is_dir()


def makedirs(path: PathLike, exist_ok: bool = True) -> None:
  """``os.makedirs``; on an object store (no real directories) epath's ``mkdir``."""
  if is_local(path):
    os.makedirs(path, exist_ok=exist_ok)
  else:
    as_path(path).mkdir(parents=True, exist_ok=exist_ok)


def listdir(path: PathLike) -> list[str]:
  """The names in directory ``path`` (unsorted, like ``os.listdir``)."""
  if is_local(path):
    return os.listdir(path)
  return [p.name for p in as_path(path).iterdir()]


def subdirs(path: PathLike) -> list[str]:
  """The names of the sub-directories of ``path`` ([] where it is not a directory)."""
  if is_local(path):
    try:
      with os.scandir(path) as it:
        return [e.name for e in it if e.is_dir()]
    except OSError:
      return []
  try:
    return [p.name for p in as_path(path).iterdir() if p.is_dir()]
  except OSError:
    return []


def glob(pattern: PathLike) -> list[str]:
  """``glob.glob`` of a local pattern; for a URI, the entries of its directory whose names
  match its last component (epath globs one level; no ``**``)."""
  pattern = os.fspath(pattern)
  if is_local(pattern):
    import glob as glob_lib
    return glob_lib.glob(pattern)
  folder, name = posixpath.split(pattern)
  if not isdir(folder):
    return []
  return [join(folder, n) for n in listdir(folder) if fnmatch.fnmatchcase(n, name)]


def remove(path: PathLike) -> None:
  if is_local(path):
    os.remove(path)
  else:
    as_path(path).unlink()


def rmtree(path: PathLike, ignore_errors: bool = False) -> None:
  if is_local(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    as_path(path).rmtree()
  except OSError:
    if not ignore_errors:
      raise


def replace(src: PathLike, dst: PathLike) -> None:
  """``os.replace``; elsewhere epath's ``replace`` (on GCS a copy and a delete)."""
  if is_local(src) and is_local(dst):
    os.replace(src, dst)
  else:
    as_path(src).replace(as_path(dst))


def stat_signature(path: PathLike) -> tuple:
  """(size, modification time) of a file, what a cache of a file's digest keys on."""
  if is_local(path):
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)
  st = as_path(path).stat()
  return (st.length, st.mtime)


def open(path: PathLike, mode: str = "r", **kwargs):  # pylint: disable=redefined-builtin
  """``open(path, mode, **kwargs)`` for a local path. For any other path: a read mode
  reads the whole file into memory (``io.BytesIO``, or ``io.TextIOWrapper`` over it with
  the given ``encoding`` (default UTF-8), ``errors`` and ``newline``); a write mode opens
  epath's writer (binary modes only: text goes through :mod:`jaxvars.atomic`)."""
  if is_local(path):
    return builtins.open(path, mode, **kwargs)
  if "r" in mode and "+" not in mode:
    buffer = io.BytesIO(read_bytes(path))
    if "b" in mode:
      return buffer
    return io.TextIOWrapper(buffer, encoding=kwargs.get("encoding") or "utf-8",
                            errors=kwargs.get("errors"), newline=kwargs.get("newline"))
  if mode not in ("wb", "ab"):
    raise ValueError(f"{path}: mode {mode!r} is not supported for a non-local path (use "
                     "jaxvars.atomic to write text)")
  return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
  if is_local(path):
    with io.open(path, "rb") as f:
      return f.read()
  p = as_path(path)
  if not p.exists():  # Backends differ in what a missing file raises, and when.
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path))
  with p.open("rb") as f:
    return f.read()


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
  with open(path, "r", encoding=encoding) as f:
    return f.read()


def np_load(path: PathLike, **kwargs):
  """``np.load(path, **kwargs)``; a non-local file is read into memory first (so
  ``mmap_mode`` is ignored there: the array is loaded)."""
  if is_local(path):
    return np.load(path, **kwargs)
  kwargs.pop("mmap_mode", None)
  return np.load(io.BytesIO(read_bytes(path)), **kwargs)


def tree_files(path: PathLike) -> list[tuple[str, str]]:
  """(relative path, full path) of every file under the non-local directory ``path``,
  sorted by relative path (epath's ``walk``).

  Raises:
    OSError: it cannot be listed.
  """
  top = os.fspath(path).rstrip("/")
  files = []
  for here, _, names in as_path(top).walk():
    here = os.fspath(here).rstrip("/")
    rel = here[len(top):].lstrip("/")
    files.extend((posixpath.join(rel, n) if rel else n, posixpath.join(here, n)) for n in names)
  return sorted(files)
