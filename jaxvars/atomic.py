"""Atomic file writes: every result, cache and figure is written to a temporary file in the
same directory and renamed when complete, so an interrupted run never leaves a
half-written file that looks finished.

Temporary files are created exclusively (``tempfile.mkstemp``: ``O_CREAT | O_EXCL``, a
random name, ``<name>.<random>.tmp[<suffix>]``), never opened by a fixed name, so a symlink
planted where a temporary file will be (another user of a shared workdir) is never written
through. :func:`write_json`, :func:`write_text`, :func:`write_npz` and :func:`write_npy`
write through the file descriptor they created; :func:`atomic_path` (for writers that take
a path) refuses to rename a temporary file that became a link or another user's file while
being written. The rename replaces a link at the final name itself, not its target. Files
get the mode a plain ``open(path, 'w')`` would give them (0666 less the umask).

**Non-local paths** (``gs://``, ...: :func:`jaxvars.fs.is_local` is False) are written
through ``etils.epath`` the same way: to ``<name>.<random hex>.tmp[<suffix>]`` beside the
final name, then renamed over it, and the temporary object is removed when the write
fails. What holds there:

* No half-written file at the final name. A GCS object becomes visible only once its
  upload completes, and epath's rename on GCS is a server-side copy to the final name
  followed by a delete of the temporary object, so a reader sees the old object or the
  complete new one. (A crash between that copy and the delete leaves a stray
  ``*.tmp*`` object beside a complete file; it is harmless and may be deleted.)
* The copy is not atomic with respect to other writers: two runs writing the same name
  at once (which the workdir lock, :mod:`jaxvars.locking`, is there to prevent) end with
  one of the two complete files.
* There are no symlinks, modes or owners on an object store: the temporary-file checks
  above (``O_EXCL``, :class:`UnsafeFileError`) apply to local paths only.
* :func:`atomic_path` hands the writer a local temporary file (in the system's temporary
  directory) and uploads it when the block succeeds; :func:`atomic_file` streams binary
  writes to the temporary object and uploads text when the block succeeds.

In a run of several processes (:mod:`jaxvars.distributed`) every process calls the same
writers in the same order; only process 0 writes, and every process waits at a barrier
before the write (so none can see the file before deciding to write it) and after it (so a
file one process reads afterwards is complete for all of them). Files
that each process keeps for itself (a data directory local to each host, a memo of a
weights file's hash) pass ``every_process=True``: written by each, no barrier.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import tempfile

import numpy as np

from jaxvars import distributed, fs
from jaxvars.errors import DiskFullError, JaxvarsError


class UnsafeFileError(JaxvarsError, OSError):
  """A temporary file was replaced (e.g. by a symlink) while it was being written."""


def _umask() -> int:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # Not thread-safe: only where /proc is missing, once at import.
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_umask()


def _create_temporary(path: str, suffix: str) -> tuple[int, str]:
  """(fd, name) of a new empty file next to ``path``, created exclusively, mode as above."""
  path = os.fspath(path)
  folder, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f"{name}.", suffix=f".tmp{suffix}")
  try:
    os.fchmod(fd, _FILE_MODE)
  except OSError:
    pass  # A file system without modes: keep mkstemp's 0600.
  return fd, tmp


def _still_ours(fd: int, tmp: str) -> bool:
  """Whether ``tmp`` is still a regular file (not a link) of our owner, given the mode of
  :data:`_FILE_MODE`. Its inode may differ from the one created: some writers (safetensors)
  replace the file they are given with one of their own (mode 0600)."""
  try:
    other = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
  except OSError:
    return False
  try:
    now, mine = os.fstat(other), os.fstat(fd)
    ours = stat.S_ISREG(now.st_mode) and now.st_uid == mine.st_uid
    if ours and (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
      with contextlib.suppress(OSError):
        os.fchmod(other, _FILE_MODE)
    return ours
  finally:
    os.close(other)


def _discard(tmp: str) -> None:
  with contextlib.suppress(OSError):
    os.remove(tmp)  # A link put there is removed itself, not its target.


def _full(path: str, e: BaseException) -> DiskFullError | None:
  """The DiskFullError naming ``path`` for a write that failed for lack of space, else None."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    full = DiskFullError(f"{path}: no space left on device ({e.strerror}); the file was not "
                         "written and no file was left half-written (its temporary file was "
                         "removed); free some space and run the same command again")
    full.errno = e.errno
    return full
  return None


def _fail(tmp: str, path: str, e: BaseException):
  """Removes the temporary file of a write to ``path`` that raised ``e``; re-raises ``e``,
  as a :class:`DiskFullError` naming ``path`` where the disk was full."""
  _discard(tmp)
  full = _full(path, e)
  if full is not None:
    raise full from None
  raise e


def _writes_here(path, every_process: bool) -> bool:
  """Whether this process writes ``path``. Without ``every_process``, every process first
  waits until all have reached this write: a process that is behind then cannot see the
  file before it decides to write it (its existence check came before the write, for all
  of them), so every process takes the same path through the program."""
  if every_process:
    return True
  distributed.barrier(f"jaxvars.atomic before {os.path.basename(fs.fspath(path))}")
  return distributed.is_main()


def _after_write(path: str, every_process: bool) -> None:
  if not every_process:
    distributed.barrier(f"jaxvars.atomic after {os.path.basename(fs.fspath(path))}")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", *, every_process: bool = False):
  """Yields the name of a new, empty temporary file next to ``path`` (ending in
  ``suffix``, for writers that add an extension: ``np.save`` adds '.npy' unless the name
  ends so); renames it to ``path`` when the block succeeds, removes it otherwise.

  Raises:
    UnsafeFileError: the temporary file became a link or another user's file while the
      block wrote it; nothing is renamed.
    OSError: the directory of ``path`` cannot be written.
  """
  if not _writes_here(path, every_process):  # Another process writes it: a private scratch file.
    with tempfile.TemporaryDirectory() as scratch:
      yield os.path.join(scratch, os.path.basename(fs.fspath(path)) + suffix)
    _after_write(path, every_process)
    return
  if not fs.is_local(path):
    with _remote_atomic_path(path, suffix) as tmp:
      yield tmp
    _after_write(path, every_process)
    return
  fd, tmp = _create_temporary(path, suffix)
  try:
    yield tmp
    if not _still_ours(fd, tmp):
      raise UnsafeFileError(f"{tmp}: the temporary file of {path} was replaced while it was "
                            "written (another user of this directory?); not installed")
    os.replace(tmp, path)
  except BaseException as e:
    _fail(tmp, path, e)
  finally:
    os.close(fd)
  _after_write(path, every_process)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, every_process: bool = False, **open_kwargs):
  """Yields a file object open for writing on a new temporary file next to ``path``
  (``mode``: 'w' or 'wb', with ``open``'s keyword arguments); renames it to ``path`` when
  the block succeeds, removes it otherwise. Nothing is opened by name.

  Raises:
    OSError: the directory of ``path`` cannot be written.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r} is not 'w' or 'wb'")
  if not _writes_here(path, every_process):  # Another process writes it.
    with open(os.devnull, mode, **open_kwargs) as f:
      yield f
    _after_write(path, every_process)
    return
  if not fs.is_local(path):
    with _remote_atomic_file(path, mode, **open_kwargs) as f:
      yield f
    _after_write(path, every_process)
    return
  fd, tmp = _create_temporary(path, "")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException as e:
    _fail(tmp, path, e)
  _after_write(path, every_process)


def _remote_temporary(path: str, suffix: str) -> str:
  """``<path>.<random hex>.tmp<suffix>``: the temporary name of a non-local write."""
  return f"{fs.fspath(path)}.{os.urandom(6).hex()}.tmp{suffix}"


def _remote_fail(tmp: str, path, e: BaseException):
  with contextlib.suppress(Exception):
    if fs.exists(tmp):
      fs.remove(tmp)
  full = _full(path, e)
  if full is not None:
    raise full from None
  raise e


@contextlib.contextmanager
def _remote_atomic_path(path, suffix: str):
  """:func:`atomic_path` of a non-local ``path``: the writer gets a local temporary file,
  which is uploaded to a temporary object beside ``path`` and renamed to ``path``."""
  fd, local = tempfile.mkstemp(prefix="jaxvars-", suffix=f".tmp{suffix}")
  os.close(fd)
  tmp = _remote_temporary(path, suffix)
  try:
    yield local
    with io.open(local, "rb") as src, fs.as_path(tmp).open("wb") as dst:
      shutil.copyfileobj(src, dst)
    fs.replace(tmp, path)
  except BaseException as e:
    _remote_fail(tmp, path, e)
  finally:
    with contextlib.suppress(OSError):
      os.remove(local)


@contextlib.contextmanager
def _remote_atomic_file(path, mode: str, **open_kwargs):
  """:func:`atomic_file` of a non-local ``path``: binary writes stream to a temporary object
  beside ``path``; text is kept in memory and uploaded (UTF-8 unless ``encoding``) when the
  block succeeds; the temporary object is then renamed to ``path``."""
  tmp = _remote_temporary(path, "")
  try:
    if mode == "wb":
      with fs.as_path(tmp).open("wb") as f:
        yield f
    else:
      text = io.StringIO(newline=open_kwargs.get("newline"))
      yield text
      data = text.getvalue().encode(open_kwargs.get("encoding") or "utf-8",
                                    open_kwargs.get("errors") or "strict")
      with fs.as_path(tmp).open("wb") as f:
        f.write(data)
    fs.replace(tmp, path)
  except BaseException as e:
    _remote_fail(tmp, path, e)


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


def write_json(path: str, obj, *, every_process: bool = False) -> None:
  """Writes ``obj`` as indented JSON (numpy scalars and arrays become numbers and lists)."""
  with atomic_file(path, "w", every_process=every_process) as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    f.write("\n")


def write_text(path: str, text: str, *, every_process: bool = False) -> None:
  """Writes a text file."""
  with atomic_file(path, "w", every_process=every_process) as f:
    f.write(text)


def write_npz(path: str, arrays: dict, *, compressed: bool = True,
              every_process: bool = False) -> None:
  """Writes a dict of arrays as ``.npz`` (at ``path`` exactly: no extension is added)."""
  with atomic_file(path, "wb", every_process=every_process) as f:
    (np.savez_compressed if compressed else np.savez)(f, **arrays)


def write_npy(path: str, array: np.ndarray, *, every_process: bool = False) -> None:
  """Writes one array as ``.npy`` (memory-mappable; at ``path`` exactly)."""
  with atomic_file(path, "wb", every_process=every_process) as f:
    np.save(f, array)
