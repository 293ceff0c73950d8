"""Compares two runs' results.json key by key: every number that moved, every key only one
of them has. Wall-clock fields (timing, time_s), provenance and the config are left out.

  python -m jaxvars.report.diff BEFORE/results.json AFTER/results.json [--tolerance 0]

Exits 0 when no shared number moved (keys added by the newer version are listed, not
counted), 1 when one did, 2 on a file that cannot be read.
"""

from __future__ import annotations

import argparse
import math
import sys

from jaxvars.errors import DataError

IGNORED = ("timing", "time_s", "cached", "provenance", "evaluate_provenance", "config")


def flatten(node, prefix: str = "") -> dict:
  """{'a/b/0/c': leaf} of a JSON tree (dict keys and list indices joined by '/')."""
  if isinstance(node, dict):
    out = {}
    for k, v in node.items():
      if k not in IGNORED:
        out.update(flatten(v, f"{prefix}{k}/"))
    return out
  if isinstance(node, list):
    out = {}
    for i, v in enumerate(node):
      out.update(flatten(v, f"{prefix}{i}/"))
    return out
  return {prefix.rstrip("/"): node}


def _same(a, b, tolerance: float) -> bool:
  if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
    if math.isnan(a) and math.isnan(b):
      return True
    return abs(a - b) <= tolerance
  return a == b


def diff(before: dict, after: dict, tolerance: float = 0.0) -> dict:
  """{'moved': [(key, before, after)], 'only_before': [keys], 'only_after': [keys],
  'compared': number of shared leaves}."""
  a, b = flatten(before), flatten(after)
  shared = [k for k in a if k in b]
  return {"moved": [(k, a[k], b[k]) for k in shared if not _same(a[k], b[k], tolerance)],
          "only_before": [k for k in a if k not in b],
          "only_after": [k for k in b if k not in a], "compared": len(shared)}


def _sections(keys) -> dict:
  out = {}
  for k in keys:
    section = k.split("/", 1)[0]
    out[section] = out.get(section, 0) + 1
  return out


def main(argv=None) -> int:
  from jaxvars.report.writer import read_results
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("before")
  parser.add_argument("after")
  parser.add_argument("--tolerance", type=float, default=0.0,
                      help="largest absolute difference of two floats counted as equal")
  args = parser.parse_args(argv)
  try:
    before, after = read_results(args.before), read_results(args.after)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path, res in ((args.before, before), (args.after, after)):
    if res is None:
      print(f"error: {path} does not exist", file=sys.stderr)
      return 2
  d = diff(before, after, args.tolerance)
  print(f"{d['compared']} values compared; {len(d['moved'])} moved")
  for key, x, y in d["moved"]:
    print(f"  moved  {key}: {x!r} -> {y!r}")
  for what in ("only_before", "only_after"):
    if d[what]:
      counts = ", ".join(f"{s} ({n})" for s, n in _sections(d[what]).items())
      print(f"{what.replace('_', ' ')}: {len(d[what])} values in {counts}")
  return 1 if d["moved"] else 0


if __name__ == "__main__":
  sys.exit(main())
