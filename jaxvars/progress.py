"""Progress display with rate and ETA for long loops.

On a terminal: a tqdm bar redrawn in place. Elsewhere (a log file, CI, ``nohup``): plain
log lines (absl logging, INFO) at most every ``interval`` seconds and at the end, with the
count, rate, ETA and the latest postfix, so a log holds no carriage returns, escape codes
or "0%|" fragments.
"""

from __future__ import annotations

import sys
import time

from absl import logging
from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0


class PlainProgress:
  """An iterable that logs ``desc: n/total (rate/s, ETA ...) postfix`` periodically; the
  same ``set_postfix`` as tqdm."""

  def __init__(self, iterable, *, desc: str, total: int | None = None, initial: int = 0,
               interval: float = PLAIN_INTERVAL_S):
    self.iterable, self.desc, self.initial = iterable, desc, initial
    self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__")
                                                  else None)
    self.interval, self.postfix = interval, ""

  def set_postfix(self, refresh: bool = False, **values) -> None:
    del refresh
    self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def set_description(self, desc: str, refresh: bool = False) -> None:
    """Renames the loop (tqdm's ``set_description``), e.g. when a training stage starts."""
    del refresh
    self.desc = desc

  def _line(self, n: int, start: float) -> str:
    elapsed = max(time.perf_counter() - start, 1e-9)
    done = n - self.initial
    rate = done / elapsed
    total = f"/{self.total}" if self.total is not None else ""
    eta = ""
    if self.total is not None and rate > 0:
      eta = f", ETA {(self.total - n) / rate:.0f} s"
    return f"{self.desc}: {n}{total} ({rate:.2f}/s{eta}) {self.postfix}".rstrip()

  def __iter__(self):
    start = last = time.perf_counter()
    n = self.initial
    for item in self.iterable:
      yield item
      n += 1
      now = time.perf_counter()
      if now - last >= self.interval:
        logging.info("%s", self._line(n, start))
        last = now
    if n > self.initial and time.perf_counter() - start >= self.interval:
      logging.info("%s (done)", self._line(n, start))


def progress(iterable, *, desc: str, total: int | None = None, initial: int = 0, **kwargs):
  """Wraps ``iterable`` in a progress display on stderr: a tqdm bar on a terminal, periodic
  plain log lines elsewhere (see the module docstring)."""
  if sys.stderr.isatty():
    return tqdm(iterable, desc=desc, total=total, initial=initial, dynamic_ncols=True,
                leave=False, mininterval=0.1, file=sys.stderr, **kwargs)
  return PlainProgress(iterable, desc=desc, total=total, initial=initial)


def memory_gb() -> tuple[float, float]:
  """(current, peak) resident set size of this process in GB (10^9 bytes), from
  ``/proc/self/statm`` and ``getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on macOS).
  The current size is NaN where ``/proc`` is absent. Host memory only: an accelerator's
  memory is not counted."""
  import resource  # Unix only; imported here so that the module loads everywhere.

  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak_bytes = peak if sys.platform == "darwin" else peak * 1024
  try:
    with open("/proc/self/statm") as f:
      current = int(f.read().split()[1]) * resource.getpagesize()
  except (OSError, ValueError, IndexError):
    current = float("nan")
  return current / 1e9, peak_bytes / 1e9
