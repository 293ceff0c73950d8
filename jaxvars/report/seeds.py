"""The headline table over seeds: mean and range of every ranking row's HR@10 and NDCG@10
(all users and out of sample), and of detection accuracy, over runs that differ only in
``config.seed``.

  python -m jaxvars.report.seeds --workdirs=/tmp/s0,/tmp/s1,/tmp/s2 --out=/tmp/seeds.md

(``launch/seeds.sh`` runs the seeds and then this.) Each cell: the mean over seeds, the
range [min, max] over seeds, and the mean width of the per-run 95% bootstrap interval
(the within-run uncertainty, for comparison with the between-seed spread). Writes the
markdown table and a JSON beside it.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from jaxvars import atomic
from jaxvars.errors import JaxvarsError
from jaxvars.report.tables import fmt, label, md_table

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs of runs that differ only in seed.")
_OUT = flags.DEFINE_string("out", None, "The markdown file to write (JSON beside it).")

METRICS = ("HR@10", "NDCG@10")


def _load(workdir: str) -> dict:
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise JaxvarsError(f"{path}: cannot read results ({e})") from None


def summarize(runs: list[dict]) -> dict:
  """{section: {row: {metric: {'mean', 'min', 'max', 'ci_width'}}}} over ``runs``, for the
  rows every run has; plus 'detection': {condition: {'accuracy': ...}}; 'seeds'."""
  out = {"seeds": [r.get("config", {}).get("seed") for r in runs]}
  for section in ("ranking", "ranking_unseen"):
    rows = set.intersection(*(set(r.get(section, {})) for r in runs))
    out[section] = {}
    for row in (k for k in runs[0].get(section, {}) if k in rows):
      out[section][row] = {}
      for m in METRICS:
        values = np.array([r[section][row][m] for r in runs])
        widths = [np.diff(r[section][row]["ci95"][m])[0] for r in runs
                  if m in r[section][row].get("ci95", {})]
        out[section][row][m] = {"mean": float(values.mean()), "min": float(values.min()),
                                "max": float(values.max()),
                                "ci_width": float(np.mean(widths)) if widths else None}
  conds = set.intersection(*(set(r.get("detection", {})) for r in runs))
  out["detection"] = {}
  for cond in (c for c in runs[0].get("detection", {}) if c in conds):
    values = np.array([r["detection"][cond]["accuracy"] for r in runs])
    out["detection"][cond] = {"accuracy": {"mean": float(values.mean()),
                                           "min": float(values.min()),
                                           "max": float(values.max())}}
  return out


def markdown(summary: dict, first_run: dict) -> list[str]:
  """The summary as markdown tables."""
  lines = [f"# Over seeds {summary['seeds']}", "",
           "Each cell: mean over seeds [min, max over seeds]; 'CI width': the mean width of the "
           "runs' own 95% bootstrap intervals.", ""]
  titles = {"ranking": "All test users", "ranking_unseen": "Out of sample (unseen items)"}
  for section, title in titles.items():
    rows = []
    for row, cells in summary.get(section, {}).items():
      system, cond = row.split("/", 1)
      rows.append([cond, label(first_run, system)] + [
          f"{fmt(c['mean'])} [{fmt(c['min'])}, {fmt(c['max'])}]" for c in cells.values()] + [
          fmt(cells["HR@10"]["ci_width"])])
    if rows:
      lines += [f"## {title}", ""] + md_table(
          ["condition", "system"] + list(METRICS) + ["HR@10 CI width"], rows) + [""]
  det = [[cond, f"{fmt(c['accuracy']['mean'])} [{fmt(c['accuracy']['min'])}, "
                f"{fmt(c['accuracy']['max'])}]"] for cond, c in summary["detection"].items()]
  if det:
    lines += ["## Detection accuracy", ""] + md_table(["condition", "accuracy"], det) + [""]
  return lines


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if not _WORKDIRS.value or len(_WORKDIRS.value) < 2:
      raise JaxvarsError("--workdirs needs at least two comma-separated workdirs")
    runs = [_load(w) for w in _WORKDIRS.value]
    summary = summarize(runs)
    out = _OUT.value or os.path.join(_WORKDIRS.value[0], "..", "seeds.md")
    atomic.write_text(out, "\n".join(markdown(summary, runs[0])))
    atomic.write_json(os.path.splitext(out)[0] + ".json", summary)
  except JaxvarsError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"written {out}")


if __name__ == "__main__":
  app.run(main)
