"""Atomic file writes: every result, cache and figure is written to a temporary name in the
same directory and renamed when complete, so an interrupted run never leaves a
half-written file that looks finished."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
  """Yields a temporary path next to ``path`` (ending in ``suffix``, for writers that add
  an extension); renames it to ``path`` when the block succeeds, removes it otherwise."""
  tmp = f"{path}.tmp{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as indented JSON (numpy scalars and arrays become numbers and lists)."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  """Writes a text file."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_npz(path: str, arrays: dict, *, compressed: bool = True) -> None:
  """Writes a dict of arrays as ``.npz``."""
  with atomic_path(path, ".npz") as tmp:
    (np.savez_compressed if compressed else np.savez)(tmp, **arrays)


def write_npy(path: str, array: np.ndarray) -> None:
  """Writes one array as ``.npy`` (memory-mappable)."""
  with atomic_path(path, ".npy") as tmp:
    np.save(tmp, array)
