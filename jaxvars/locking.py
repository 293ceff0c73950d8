"""OS-level locks: one run per workdir, one preparation per dataset table.

A lock is an exclusive ``fcntl.flock`` on a small file that holds its holder's pid, host
and start time (JSON). The operating system releases a flock when its holder exits in any
way (kill -9 included), so a lock file left behind by a killed run is free and the next run
takes it over; a run that ends normally removes its file.

* :func:`lock_run`: ``<workdir>/.jaxvars.lock`` (and the same file in each ablation
  sub-workdir ``<workdir>/ablations/<name>`` the run writes into), held for the whole run of
  ``jaxvars.main``'s train, evaluate and report modes. A second run on the same workdir,
  or on one of those sub-workdirs, stops at once with :class:`WorkdirLockedError` naming
  the holder.
* :func:`preparing`: ``<tfds_dir>/.jaxvars-prepare.<dataset>.<config>.lock`` while a
  table is prepared; a second preparation of the same table waits for the first, then
  finds it prepared and reuses it.

Lock files are opened with ``O_NOFOLLOW`` and must be regular files with one link, so a
symlink planted at their name is refused, never written through.

**Non-local workdirs and tfds directories** (``gs://``, ...: :func:`jaxvars.fs.is_local`
is False) have no flock and no operating system to release a lock when its holder dies.
There :class:`ObjectLock` stands in for :class:`FileLock`: the lock is the *existence* of
the same file, written through ``etils.epath`` with the holder's pid, host, start time and
a random token, then read back. It is weaker than a flock, and these are its limits:

* Not an atomic test-and-set (epath has no exclusive create): two runs started on the same
  workdir within the same second or so can both find it free; the read-back of the token
  catches most such races (the later writer wins, the other stops), not all.
* A run killed without running its cleanup (``kill -9``, a preempted VM) leaves the file
  behind, and the next run stops with :class:`WorkdirLockedError` naming the holder and
  the file. A lock of this host whose pid no longer runs is taken over; one of another
  host must be deleted by hand (``gsutil rm <workdir>/.jaxvars.lock``) once you know that
  run is gone.
* A preparation lock in a non-local ``config.data.tfds_dir`` is waited for (polling every
  few seconds, logged with the file to delete if its holder is gone).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator

from absl import logging

from jaxvars import fs, workdir as wd
from jaxvars.errors import ConfigError, DataError, JaxvarsError

LOCK_FILE = wd.LOCK_FILE
ABLATIONS_DIR = wd.ABLATIONS_DIR  # <workdir>/ablations/<name>: jaxvars.ablations' sub-workdirs.
_PREPARE_PREFIX = ".jaxvars-prepare."
_READ_TRIES = 20  # A holder writes its info just after taking the lock: retry an empty read.


class WorkdirLockedError(JaxvarsError, RuntimeError):
  """Another run holds the lock of a workdir (its pid and host are in the message)."""


class UnsafeLockFileError(JaxvarsError, OSError):
  """The lock file's name holds a symlink, a directory or another special file."""


def _holder_info() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _open_lock_file(path: str) -> int:
  """An fd on the regular file ``path`` (created if absent), never through a symlink.

  Raises:
    UnsafeLockFileError: ``path`` is a symlink, not a regular file, or has other hard links.
    OSError: it cannot be created or opened (e.g. a read-only directory).
  """
  flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
  try:
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafeLockFileError(f"{path} is a symbolic link; jaxvars does not write through a "
                                "link at its lock file: remove it") from None
    if e.errno == errno.EISDIR:
      raise UnsafeLockFileError(f"{path} is a directory, not a lock file: remove it") from None
    raise
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
    os.close(fd)
    raise UnsafeLockFileError(f"{path} is not a plain file of its own (a special file or a "
                              "hard link); remove it")
  return fd


def read_holder(path: str) -> dict:
  """The holder info written in the lock file ``path`` ({} if absent or unreadable)."""
  if not fs.is_local(path):
    return _read_object_holder(path)
  for _ in range(_READ_TRIES):
    try:
      fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
      return {}
    try:
      if not stat.S_ISREG(os.fstat(fd).st_mode):
        return {}
      text = os.read(fd, 4096).decode("utf-8", "replace")
    finally:
      os.close(fd)
    if text.strip():
      try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
      except ValueError:
        return {}
    time.sleep(0.025)
  return {}


def describe_holder(info: dict) -> str:
  """'pid 123 on host h, since 2024-...' (or 'pid unknown' for an empty lock file)."""
  if not info:
    return "pid unknown (the lock file is empty)"
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
          + (f", since {info['started']}" if info.get("started") else ""))


class FileLock:
  """An exclusive flock on ``path``, holding this process's pid, host and start time.

  The file is created if absent and removed by :meth:`release`; one left by a killed
  holder (the OS released its flock) is taken over. ``acquire`` checks, after locking,
  that ``path`` still names the locked file (a holder may have removed it meanwhile).
  """

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self, *, blocking: bool) -> bool:
    """Takes the lock; returns False if another process holds it and not ``blocking``.

    Raises:
      UnsafeLockFileError: see :func:`_open_lock_file`. OSError: the file cannot be made.
    """
    if self._fd is not None:
      return True
    while True:
      fd = _open_lock_file(self.path)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
      except BlockingIOError:
        os.close(fd)
        return False
      except BaseException:
        os.close(fd)
        raise
      try:
        now = os.stat(self.path, follow_symlinks=False)
        mine = os.fstat(fd)
        same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # Removed (or replaced) by its holder while we waited: lock the new one.
    previous = read_holder(self.path) if os.fstat(fd).st_size else {}
    if previous and previous.get("pid") != os.getpid():
      logging.info("%s: taking over the lock of a run that has stopped (%s)", self.path,
                   describe_holder(previous))
    data = json.dumps(_holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    self._fd = fd
    return True

  def release(self) -> None:
    """Removes the lock file and releases the lock (no-op if not held)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      now = os.stat(self.path, follow_symlinks=False)
      mine = os.fstat(fd)
      if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
        os.unlink(self.path)  # While still locked: a waiter then re-opens a new file.
    except OSError:
      pass
    finally:
      os.close(fd)  # Releases the flock.


def _read_object_holder(path: str) -> dict:
  try:
    info = json.loads(fs.read_text(path))
  except (OSError, ValueError):
    return {}
  return info if isinstance(info, dict) else {}


def _pid_runs(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (OSError, TypeError, ValueError, OverflowError):
    return True  # Another user's process (EPERM), or no pid: assume it runs.
  return True


_POLL_SECONDS = 5.0


class ObjectLock:
  """The lock of a non-local path (see the module doc): a file that exists while a run
  holds it, with :class:`FileLock`'s interface. Written through :mod:`jaxvars.atomic`."""

  def __init__(self, path: str):
    self.path = path
    self._token: str | None = None

  @property
  def held(self) -> bool:
    return self._token is not None

  def _free(self) -> bool:
    """Whether no live run holds the file (absent, empty, or this host's dead pid)."""
    if not fs.exists(self.path):
      return True
    info = _read_object_holder(self.path)
    if not info:
      return False  # Being written, or unreadable: not ours to take.
    if info.get("host") == socket.gethostname() and not _pid_runs(info.get("pid")):
      logging.info("%s: taking over the lock of a run that has stopped (%s)", self.path,
                   describe_holder(info))
      return True
    return False

  def acquire(self, *, blocking: bool) -> bool:
    """Takes the lock; returns False if another run holds it and not ``blocking`` (which
    polls every few seconds).

    Raises:
      OSError: the file cannot be written.
    """
    from jaxvars import atomic
    if self._token is not None:
      return True
    while True:
      if self._free():
        token = uuid.uuid4().hex
        atomic.write_text(self.path, json.dumps(dict(_holder_info(), token=token)),
                          every_process=True)  # Only the process that locks writes it.
        if _read_object_holder(self.path).get("token") == token:
          self._token = token
          return True
      if not blocking:
        return False
      logging.info("%s is held by %s; waiting (delete it if that run is gone)", self.path,
                   describe_holder(_read_object_holder(self.path)))
      time.sleep(_POLL_SECONDS)

  def release(self) -> None:
    """Deletes the lock file if it is still this run's (no-op if not held)."""
    if self._token is None:
      return
    token, self._token = self._token, None
    try:
      if _read_object_holder(self.path).get("token") == token:
        fs.remove(self.path)
    except OSError:
      pass


def _lock_for(path: str):
  """:class:`FileLock` for a local path, :class:`ObjectLock` for any other."""
  return FileLock(path) if fs.is_local(path) else ObjectLock(path)


class RunLock:
  """The locks of one run (:func:`lock_run`); :meth:`release` frees all of them."""

  def __init__(self, locks: list):
    self.locks = locks

  def release(self) -> None:
    for lock in reversed(self.locks):
      lock.release()

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock_workdir(workdir: str, *, what: str = "--workdir") -> FileLock:
  """Takes ``<workdir>/.jaxvars.lock`` (creating ``workdir``) without waiting.

  Raises:
    WorkdirLockedError: another process holds it; the message names its pid and host.
    ConfigError: ``workdir`` cannot be created or written, or its lock file's name holds a
      symlink or a special file.
  """
  lock = _lock_for(fs.join(workdir, LOCK_FILE))
  try:
    fs.makedirs(workdir, exist_ok=True)
    taken = lock.acquire(blocking=False)
  except UnsafeLockFileError as e:
    raise ConfigError(f"{what}={workdir}: {e}") from None
  except OSError as e:
    raise ConfigError(f"{what}={workdir}: cannot write there ({e.strerror or e}); choose a "
                      "directory you can write") from None
  if not taken:
    holder = describe_holder(read_holder(lock.path))
    raise WorkdirLockedError(
        f"{what}={workdir} is in use by another jaxvars run ({holder}; lock file "
        f"{lock.path}); wait for it to finish, stop it, or use another --workdir")
  return lock


def _ablation_names(config) -> list[str]:
  """The ablation variants' sub-workdir names of ``config`` ([] if it has none or its
  ablation fields are invalid: the run itself reports those)."""
  try:
    from jaxvars.overrides import ablation_variants
    names = list(ablation_variants(config))
  except Exception:  # pylint: disable=broad-except
    return []
  return [n for n in names if n and os.path.basename(n) == n and n not in (".", "..")]


def lock_run(workdir: str, config=None, *, mode: str = "train") -> RunLock:
  """Locks ``workdir`` for one run of ``jaxvars.main`` (released by ``RunLock.release``, or
  by the OS when the process ends).

  Train and evaluate runs of a config with ablation variants also lock each sub-workdir
  ``<workdir>/ablations/<name>`` they write into (created if absent), so that a run
  started on one of them separately and this run exclude each other. In ``evaluate`` and
  ``report`` modes a workdir that does not exist is not created (the run reports it).

  Raises:
    WorkdirLockedError: another run holds ``workdir`` or one of its sub-workdirs.
    ConfigError: see :func:`lock_workdir`.
  """
  workdir = fs.fspath(workdir)
  if mode != "train" and not fs.isdir(workdir):
    return RunLock([])
  locks = [lock_workdir(workdir)]
  try:
    if mode in ("train", "evaluate") and config is not None:
      for name in _ablation_names(config):
        sub = fs.join(workdir, ABLATIONS_DIR, name)
        if mode == "evaluate" and not fs.isdir(sub):
          continue
        locks.append(lock_workdir(sub, what=f"--workdir={workdir}'s ablation sub-workdir"))
  except BaseException:
    RunLock(locks).release()
    raise
  return RunLock(locks)


def _prepare_lock_path(root: str, dataset: str, config_name: str) -> str:
  return fs.join(root, f"{_PREPARE_PREFIX}{dataset}.{config_name}.lock")


@contextlib.contextmanager
def preparing(root: str, tables: Iterable[tuple[str, str]]) -> Iterator[None]:
  """Holds the preparation lock of each (dataset, config name) table in the tfds directory
  ``root``, waiting while another process prepares one of them (logged, with its pid and
  host). Locks are taken in sorted order, so two preparations never deadlock.

  Raises:
    DataError: naming config.data.tfds_dir when ``root`` cannot be created or written, or
      a lock file's name holds a symlink or a special file.
  """
  locks = []
  try:
    for dataset, config_name in sorted(set(tables)):
      lock = _lock_for(_prepare_lock_path(root, dataset, config_name))
      try:
        fs.makedirs(root, exist_ok=True)
        if not lock.acquire(blocking=False):
          logging.info("waiting for another run preparing %s/%s in %s (%s)", dataset,
                       config_name, root, describe_holder(read_holder(lock.path)))
          lock.acquire(blocking=True)
      except UnsafeLockFileError as e:
        raise DataError(f"config.data.tfds_dir={root}: {e}") from None
      except OSError as e:
        raise DataError(f"config.data.tfds_dir={root}: cannot write there "
                          f"({e.strerror or e}); choose a directory you can write") from None
      locks.append(lock)
    yield
  finally:
    for lock in reversed(locks):
      lock.release()
