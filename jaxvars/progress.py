"""Progress display with rate and ETA for long loops (tqdm)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, *, desc: str, total: int | None = None, **kwargs):
  """Wraps ``iterable`` in a tqdm bar showing count, rate and ETA on stderr.

  On a terminal the bar redraws in place; elsewhere (logs, CI) it prints a line
  at most every 30 seconds.
  """
  interactive = sys.stderr.isatty()
  return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False,
              mininterval=0.1 if interactive else 30.0, file=sys.stderr, **kwargs)
