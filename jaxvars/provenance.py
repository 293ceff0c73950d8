"""Where a measurement came from: the code version, the command, the software and the machine.

Every ``results.json`` and every benchmark's JSON carries ``provenance`` (:func:`describe`),
so a table regenerated from it (:mod:`jaxvars.report.pages`) can name its command and code
version without anyone retyping them.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version(repo: str = _REPO) -> str:
  """The git commit of ``repo`` (short hash, ``+dirty`` when tracked files differ from it),
  or ``'unknown'`` where it is not a git checkout or git is missing. Never raises."""
  try:
    run = lambda *args: subprocess.run(  # noqa: E731
        ["git", "-C", repo, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    commit = run("rev-parse", "--short", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


# The version of the code this process runs: read when this module is first imported (with
# the rest of jaxvars), not when a long run ends, after which HEAD may have moved.
CODE_AT_IMPORT = code_version()


def command(argv=None) -> str:
  """``argv`` (default: this process's, with ``python -m`` for a module run with ``-m``) as
  a shell would read it."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None) if argv is None else None
  argv = list(sys.argv if argv is None else argv)
  if argv and spec is not None and spec.name and argv[0].endswith(".py"):
    head = ["python", "-m", spec.name.removesuffix(".__main__")]
  else:
    head = ["python"] + argv[:1]
  return shlex.join(head + argv[1:])


def describe(argv=None) -> dict:
  """``{'code', 'command', 'date' (UTC, ISO 8601), 'python', 'jax', 'jaxlib', 'platform',
  'devices', 'cpu_count', 'machine'}`` of this process. ``code`` is :data:`CODE_AT_IMPORT`,
  the version when this process imported jaxvars; ``date`` is now. JAX is imported only if it already
  is (the devices are then those JAX sees)."""
  out = {"code": CODE_AT_IMPORT, "command": command(argv),
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "machine": f"{platform.system()} {platform.machine()}"}
  jax = sys.modules.get("jax")
  if jax is not None:
    import jaxlib  # noqa: PLC0415 - only where jax is loaded already.
    devices = jax.devices()
    out.update(jax=jax.__version__, jaxlib=jaxlib.__version__,
               platform=devices[0].platform, devices=len(devices))
  return out
