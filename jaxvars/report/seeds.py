"""The headline table over seeds: mean and range of every ranking row's HR@10 and NDCG@10
(all users and out of sample), of detection accuracy and ROC AUC, of the denoiser's
fidelity, and of every paired difference a run draws a conclusion from (with how many seeds
find it 'higher', 'lower' or 'no measurable change'), over runs that differ only in
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

from jaxvars import atomic, fs, workdir as wd
from jaxvars.errors import JaxvarsError
from jaxvars.report.rows import records
from jaxvars.report.tables import fmt, label, md_table

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs of runs that differ only in seed.")
_OUT = flags.DEFINE_string("out", None, "The markdown file to write (JSON beside it).")

METRICS = ("HR@10", "NDCG@10")
GROUPS = ("all", "unseen")  # User groups of results['comparisons'].
EFFECTS = ("higher", "lower", "none")
FIDELITY = ("psnr", "ssim")


def _load(workdir: str) -> dict:
  path = wd.results_path(workdir)
  try:
    with fs.open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise JaxvarsError(f"{path}: cannot read results ({e})") from None


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def _common(runs: list[dict], section: str) -> list[str]:
  """Keys of ``section`` every run has, in the first run's order."""
  keys = set.intersection(*(set(r.get(section) or {}) for r in runs))
  return [k for k in (runs[0].get(section) or {}) if k in keys]


def summarize(runs: list[dict]) -> dict:
  """Mean and range over ``runs`` of what every run has.

  Returns:
    {'seeds': [seed of each run],
     'ranking' / 'ranking_unseen': {row: {metric: {'mean', 'min', 'max', 'ci_width'}}}
       ('ci_width': the mean width of the runs' own 95% intervals),
     'detection': {condition: {'accuracy' / 'roc_auc': {'mean', 'min', 'max'}}},
     'fidelity': {condition: {'psnr' / 'ssim': {'mean', 'min', 'max'}}},
     'comparisons': {'<row a> - <row b>': {'all' / 'unseen': {metric: {'mean', 'min',
       'max', 'effects': {'higher' / 'lower' / 'none': number of runs}}}}}}.
  """
  out = {"seeds": [r.get("config", {}).get("seed") for r in runs]}
  for section in ("ranking", "ranking_unseen"):
    out[section] = {}
    for row in _common(runs, section):
      out[section][row] = {}
      for m in METRICS:
        widths = [np.diff(r[section][row]["ci95"][m])[0] for r in runs
                  if m in r[section][row].get("ci95", {})]
        out[section][row][m] = dict(_stats([r[section][row][m] for r in runs]),
                                    ci_width=float(np.mean(widths)) if widths else None)
  for section, metrics in (("detection", ("accuracy", "roc_auc")), ("fidelity", FIDELITY)):
    out[section] = {}
    for cond in _common(runs, section):
      out[section][cond] = {m: _stats([r[section][cond][m] for r in runs])
                            for m in metrics if all(m in r[section][cond] for r in runs)}
  out["comparisons"] = {}
  for key in _common(runs, "comparisons"):
    out["comparisons"][key] = {}
    for group in GROUPS:
      cells = [r["comparisons"][key].get(group) or {} for r in runs]
      out["comparisons"][key][group] = {
          m: dict(_stats([c[m]["diff"] for c in cells]),
                  effects={e: sum(c[m]["effect"] == e for c in cells) for e in EFFECTS})
          for m in METRICS if all(m in c for c in cells)}
  return out


def verdict(effects: dict) -> str:
  """How a paired difference reads over seeds: 'higher in 3/3 seeds', 'no measurable change
  in 2/3 (lower in 1)', ... (each seed's effect: its own 95% interval excludes 0 or not)."""
  n = sum(effects.values())
  ranked = sorted(EFFECTS, key=lambda e: -effects[e])
  name = {"higher": "higher", "lower": "lower", "none": "no measurable change"}
  text = f"{name[ranked[0]]} in {effects[ranked[0]]}/{n} seeds"
  rest = [f"{name[e]} in {effects[e]}" for e in ranked[1:] if effects[e]]
  return text + (f" ({', '.join(rest)})" if rest else "")


def _row_label(run: dict, row: str) -> str:
  r = records(run).row(row)
  return f"{label(run, r.system)} {r.condition}"


def markdown(summary: dict, first_run: dict) -> list[str]:
  """The summary as markdown tables."""
  lines = [f"# Over seeds {summary['seeds']}", "",
           "Each cell: mean over seeds [min, max over seeds]; 'CI width': the mean width of the "
           "runs' own 95% bootstrap intervals.", ""]
  titles = {"ranking": "All test users", "ranking_unseen": "Out of sample (unseen items)"}
  rec = records(first_run)
  for section, title in titles.items():
    rows = []
    for row, cells in summary.get(section, {}).items():
      r = rec.row(row)
      rows.append([r.condition, label(first_run, r.system)] + [
          f"{fmt(c['mean'])} [{fmt(c['min'])}, {fmt(c['max'])}]" for c in cells.values()] + [
          fmt(cells["HR@10"]["ci_width"])])
    if rows:
      lines += [f"## {title}", ""] + md_table(
          ["condition", "system"] + list(METRICS) + ["HR@10 CI width"], rows) + [""]
  def spread(c, m):
    return f"{fmt(c[m]['mean'])} [{fmt(c[m]['min'])}, {fmt(c[m]['max'])}]" if m in c else "-"

  det = [[cond, spread(c, "accuracy"), spread(c, "roc_auc")]
         for cond, c in summary.get("detection", {}).items()]
  if det:
    lines += ["## Detection (unseen items)", ""] + md_table(
        ["condition", "accuracy", "ROC AUC"], det) + [""]
  fid = [[cond] + [spread(c, m) for m in FIDELITY]
         for cond, c in summary.get("fidelity", {}).items()]
  if fid:
    lines += ["## Denoiser fidelity: D(x) against the clean photo", ""] + md_table(
        ["input", "PSNR (dB)", "SSIM"], fid) + [""]
  comps = []
  for key, groups in summary.get("comparisons", {}).items():
    a, b = key.split(" - ", 1)
    row = [f"{_row_label(first_run, a)} - {_row_label(first_run, b)}"]
    for group in GROUPS:
      c = groups.get(group, {}).get("HR@10")
      row += ([f"{c['mean']:+.4f} [{c['min']:+.4f}, {c['max']:+.4f}]", verdict(c["effects"])]
              if c else ["-", "-"])
    comps.append(row)
  if comps:
    lines += ["## Paired differences of HR@10 over seeds", "",
              "Each seed's verdict: its own 95% paired-bootstrap interval over users excludes "
              "0 ('higher' / 'lower') or not ('no measurable change'). A claim holds over "
              "seeds only where every seed finds the same effect.", ""] + md_table(
        ["difference", "all users: mean [min, max]", "all users: verdict",
         "unseen: mean [min, max]", "unseen: verdict"], comps) + [""]
  return lines


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if not _WORKDIRS.value or len(_WORKDIRS.value) < 2:
      raise JaxvarsError("--workdirs needs at least two comma-separated workdirs")
    runs = [_load(w) for w in _WORKDIRS.value]
    summary = summarize(runs)
    first = _WORKDIRS.value[0]
    out = _OUT.value or (os.path.join(first, "..", "seeds.md") if fs.is_local(first) else
                         fs.join(first.rstrip("/").rsplit("/", 1)[0], "seeds.md"))
    atomic.write_text(out, "\n".join(markdown(summary, runs[0])))
    atomic.write_json(os.path.splitext(out)[0] + ".json", summary)
  except JaxvarsError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"written {out}")


if __name__ == "__main__":
  app.run(main)
