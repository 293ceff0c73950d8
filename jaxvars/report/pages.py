"""The measured-results pages (README.md's headline table, results/*.md), regenerated from the
JSON that runs and benchmarks write, so that no number is retyped.

A page is hand-written prose with generated blocks::

  <!-- generated: KIND key=value ... -->
  (lines this module writes)
  <!-- end generated -->

Paths in a block's arguments are relative to the repository root. Kinds:

* ``provenance run=DIR``: the run's command, presets, code version, date and wall time.
* ``headline runs=DIR``: the headline table over every seed's run under ``DIR`` (each
  ``DIR/<name>/results.json``): HR@10 of VBPR and the defences under the paper's and the
  adaptive attacks, the worst case, detection accuracy.
* ``hr10 run=DIR``: HR@10 with 95% intervals of every system on clean, FGSM and PGD photos,
  all users and out of sample.
* ``robustness``, ``sanity``, ``detection``, ``fidelity``, ``targeted``, ``timing``
  (``run=DIR``): the report's tables of the same name (:mod:`jaxvars.report`).
* ``families run=DIR``: the recommender-family table (paper Tables 2-3), its paired
  differences and the feature-space attack (:mod:`jaxvars.report.families`).
* ``benchmark file=F.json``: a benchmark's ``rows`` as a table, with its provenance.

A run directory holds the run's ``results.json`` (never ``artifacts.npz``: it holds
photos) and, for a run whose results.json predates its ``provenance`` field, a
``run.json`` with the same keys (:func:`jaxvars.provenance.describe`).

  python -m jaxvars.report.pages            # rewrite every block of README.md, results/*.md
  python -m jaxvars.report.pages --check    # exit 1 naming each block that is out of date
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from absl import app, flags

from jaxvars import atomic, workdir as wd
from jaxvars.errors import JaxvarsError
from jaxvars.report import checks_tables, families, robustness, tables, targeted_tables
from jaxvars.report.rows import records

_ROOT = flags.DEFINE_string("root", ".", "Repository root (README.md, results/).")
_CHECK = flags.DEFINE_bool("check", False, "Only check that every block is up to date.")

BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.S)
PAGES = ("README.md", "results/*.md", "docs/*.md")


def _load_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise JaxvarsError(f"{path} does not exist (named by a generated block)") from None
  except json.JSONDecodeError as e:
    raise JaxvarsError(f"{path} is not valid JSON ({e})") from None


def load_run(root: str, run: str) -> dict:
  """``<root>/<run>/results.json`` with ``provenance`` filled from ``run.json`` where the
  results predate that field.

  Raises:
    JaxvarsError: the results are missing or not JSON.
  """
  path = os.path.join(root, run)
  results = _load_json(wd.results_path(path))
  sidecar = os.path.join(path, "run.json")
  if "provenance" not in results and os.path.exists(sidecar):
    results["provenance"] = _load_json(sidecar)
  return results


def _provenance_line(prov: dict) -> str:
  return (f"Command `{prov.get('command', '?')}`; code {prov.get('code', '?')}; "
          f"{prov.get('date', '?')[:10]}; {prov.get('where', _machine(prov))}.")


def _machine(prov: dict) -> str:
  plat = prov.get("platform", "?")
  return f"{prov.get('cpu_count', '?')}-core {prov.get('machine', '')}, jax {prov.get('jax', '?')} ({plat})"


def provenance(results: dict) -> list[str]:
  """One paragraph: command, presets, code version, date, machine and wall time."""
  prov = results.get("provenance", {})
  total = results.get("timing", {}).get("total_s")
  data, backbone = results.get("data", {}), results.get("backbone", {})
  line = _provenance_line(prov)
  line += (f" Presets `{results.get('config', {}).get('presets', '?')}`, seed "
           f"{results.get('config', {}).get('seed', '?')}; {data.get('users', '?')} test users, "
           f"{data.get('items', '?')} items at {data.get('image_size', '?')} px; backbone "
           f"`{backbone.get('arch', '?')}` ({backbone.get('init', '?')}).")
  if total:
    line += f" Wall time {total / 60:.1f} min."
  if prov.get("note"):
    line += " " + prov["note"]
  return [line]


def _find(results: dict, section: dict, system: str, eps: float = 8.0):
  """The first row of ``system`` under a white-box PGD attack on the paper's objective at
  ``eps`` that is not a detector-aware or sanity-check variant, and its condition record;
  (None, None) where there is none."""
  rec = records(results)
  for key in section:
    c = rec.condition_of(key)
    if (rec.row(key).system == system and c.kind == "whitebox" and c.attack == "pgd"
        and c.objective in (None, "bpr") and c.eps == eps and not c.gated):
      return key, c
  return None, None


# (label, threat model, where to read): the headline rows.
def _headline_rows(results: dict) -> list[tuple[str, str, dict | None]]:
  rank = results.get("ranking", {})
  attacked = robustness.section_ranking(results)
  robust = results.get("robust", {})
  # The undefended system's rows are named after the recommender ('vbpr/clean', 'amr/clean'),
  # and so are its headline rows ('VBPR, clean photos', 'AMR, clean photos').
  plain, plain_label = next(((name, info.get("label") or "VBPR")
                             for name, info in results.get("systems", {}).items()
                             if info.get("system") == "undefended"), ("vbpr", "VBPR"))
  rows = [(f"{plain_label}, clean photos", "-", rank.get(f"{plain}/clean")),
          (f"{plain_label}, FGSM@8", "transfer (paper)", rank.get(f"{plain}/fgsm@8")),
          (f"{plain_label}, PGD@8", "transfer (paper)", rank.get(f"{plain}/pgd@8")),
          ("OURS (denoiser), clean photos", "-", rank.get("defended/clean")),
          ("OURS, PGD@8", "transfer (paper)", rank.get("defended/pgd@8"))]
  wb, _ = _find(results, attacked, "defended")
  rows.append(("OURS, white-box PGD@8 through D", "adaptive", attacked.get(wb) if wb else None))
  wb, c = _find(results, attacked, "defended_rand")
  eot = c.eot if c is not None else None
  rows.append((f"OURS-rand, white-box PGD@8{f' + EOT {eot}' if eot else ''}",
               "adaptive", attacked.get(wb) if wb else None))
  rows.append(("OURS, worst case over every attack", "worst case", robust.get("defended")))
  return rows


def _cell(values: list, cis: list) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    lo, hi = cis[0] if cis[0] else (None, None)
    return f"{values[0]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
  mean = sum(values) / len(values)
  widths = [hi - lo for lo, hi in filter(None, cis)]
  width = f"; one run's interval +-{sum(widths) / len(widths) / 2:.3f}" if widths else ""
  return f"{mean:.3f} (seeds {min(values):.3f}-{max(values):.3f}{width})"


def headline(runs: list[dict]) -> list[str]:
  """The headline table: each row's HR@10 (one seed: with its 95% interval over users; several:
  the mean, the range over seeds and one run's interval half-width), then detection
  accuracy on PGD@8 photos of items the defence never trained on."""
  per_run = [_headline_rows(r) for r in runs]
  out = []
  for i, (name, threat, _) in enumerate(per_run[0]):
    cells = [rows[i][2] for rows in per_run if rows[i][2] is not None]
    values = [c["HR@10"] for c in cells]
    cis = [c.get("ci95", {}).get("HR@10") for c in cells]
    out.append([name, threat, _cell(values, cis)])
  det = [r.get("detection", {}).get("pgd@8") for r in runs]
  det = [d for d in det if d and "accuracy" in d]
  out.append(["detector, PGD@8 photos (accuracy at 5% FPR)", "transfer (paper)",
              _cell([d["accuracy"] for d in det], [d.get("ci95", {}).get("accuracy") for d in det])])
  seeds = sorted(r.get("config", {}).get("seed") for r in runs)
  users = runs[0].get("users", {}).get("attacked")
  note = (f"Seeds {seeds}. Adaptive rows and the worst case are on the "
          f"{users} users whose held-out item the adaptive attacks perturbed; the others on all "
          f"{runs[0].get('data', {}).get('users', '?')} test users." if users else f"Seeds {seeds}.")
  return tables.md_table(["system and photos", "threat model", "HR@10 [95% interval]"], out) + [
      "", note]


def hr10(results: dict) -> list[str]:
  """System x {clean, FGSM@8, PGD@8} HR@10 with 95% intervals, all users and unseen users."""
  header = ["system"] + [f"{c}{g}" for g in ("", ", unseen") for c in ("clean", "FGSM@8", "PGD@8")]
  rows = []
  for name in tables.baselines(results) + tables.systems(results):
    cells = [tables.cell(results.get(section, {}).get(f"{name}/{cond}"), "HR@10")
             for section in ("ranking", "ranking_unseen") for cond in ("clean", "fgsm@8", "pgd@8")]
    cells = ["" if c == "NaN" else c for c in cells]
    if any(cells):
      rows.append([tables.label(results, name)] + cells)
  return tables.md_table(header, rows)


def timing(results: dict) -> list[str]:
  """The run's ``timing`` keys in minutes; with several recommenders, each other one's
  whole part (training, its attacks, its rankings) as ``recommender <name>``, before the
  total (which includes it)."""
  rows = [[key.removesuffix("_s"), f"{value / 60:.1f}"]
          for key, value in results.get("timing", {}).items()
          if key.endswith("_s") and isinstance(value, (int, float))]
  runs = (results.get("recommenders") or {}).get("runs", {})
  more = [[f"recommender {name} (training, attacks, ranking)",
           f"{run['timing']['total_s'] / 60:.1f}"]
          for name, run in runs.items() if "total_s" in (run.get("timing") or {})]
  if more and rows and rows[-1][0] == "total":
    rows = rows[:-1] + more + rows[-1:]
  else:
    rows += more
  return tables.md_table(["part", "minutes"], rows)


def _fmt(value) -> str:
  if isinstance(value, bool):
    return "yes" if value else "**no**"
  if isinstance(value, float):
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.1f}"
  if isinstance(value, (list, tuple)):
    return "x".join(map(str, value))
  return str(value)


def benchmark(result: dict, path: str) -> list[str]:
  """A benchmark JSON's ``rows`` (a list of flat dicts; or each part's ``rows``) as tables,
  with its provenance.

  Raises:
    JaxvarsError: the JSON has no rows.
  """
  parts = [("", result)] if "rows" in result else [
      (name, part) for name, part in result.items() if isinstance(part, dict) and "rows" in part]
  if not parts:
    raise JaxvarsError(f"{path}: no 'rows' to tabulate")
  out = []
  prov = result.get("provenance")
  if prov:
    out += [_provenance_line(prov), ""]
  for name, part in parts:
    rows = part["rows"]
    header = list(dict.fromkeys(k for row in rows for k in row if not isinstance(row[k], dict)))
    if name:
      out += [f"Part ({name}):", ""]
    out += tables.md_table(header, [[_fmt(row.get(k, "")) for k in header] for row in rows])
    out.append("")
  return out[:-1]


def _eps(results: dict) -> float:
  return tables.report_eps(results) or 8.0


RUN_KINDS = {
    "provenance": provenance,
    "hr10": hr10,
    "timing": timing,
    "robustness": lambda r: robustness.worst_case_table(r, _eps(r)),
    "sanity": lambda r: robustness.sanity_checks(r, _eps(r)),
    "detection": lambda r: (checks_tables.detection_table(r) + [""] + checks_tables.noise_table(r)
                            + ([""] + checks_tables.baselines_table(r) + [""]
                               + checks_tables.baselines_noise_table(r)
                               if r.get("detection_baselines") else [])),
    "fidelity": checks_tables.fidelity_table,
    "targeted": targeted_tables.table6,
    "families": lambda r: (families.family_table(r) + [""] + families.comparison_lines(r)
                           + [""] + families.feature_attack_lines(r)),
}


def render(root: str, spec: str) -> list[str]:
  """The lines of one block (``spec``: its ``KIND key=value ...``).

  Raises:
    JaxvarsError: an unknown kind or argument, or a missing or unreadable JSON.
  """
  kind, *args = spec.split()
  try:
    kw = dict(a.split("=", 1) for a in args)
  except ValueError:
    raise JaxvarsError(f"generated block {spec!r}: arguments must be key=value") from None
  if kind == "headline":
    dirs = sorted(d for d in glob.glob(os.path.join(root, kw.get("runs", ""), "*"))
                  if os.path.exists(wd.results_path(d)))
    if not dirs:
      raise JaxvarsError(f"generated block {spec!r}: no <run>/results.json under {kw.get('runs')}")
    return headline([load_run(root, os.path.relpath(d, root)) for d in dirs])
  if kind == "benchmark":
    path = os.path.join(root, kw.get("file", ""))
    return benchmark(_load_json(path), path)
  if kind in RUN_KINDS and "run" in kw:
    return RUN_KINDS[kind](load_run(root, kw["run"]))
  raise JaxvarsError(f"generated block {spec!r}: expected one of "
                     f"{sorted(RUN_KINDS) + ['headline', 'benchmark']} with run=DIR "
                     "(headline: runs=DIR, benchmark: file=F.json)")


def regenerate(text: str, root: str) -> str:
  """``text`` with every generated block's body written anew."""
  return BLOCK.sub(lambda m: m.group(1) + "\n".join(render(root, m.group("spec"))) + "\n"
                   + m.group(4), text)


def pages(root: str) -> list[str]:
  """Every page that may hold generated blocks."""
  return [p for pattern in PAGES for p in sorted(glob.glob(os.path.join(root, pattern)))]


def stale(root: str) -> list[str]:
  """The pages whose generated blocks differ from what the JSON gives now."""
  out = []
  for page in pages(root):
    with open(page) as f:
      text = f.read()
    if regenerate(text, root) != text:
      out.append(page)
  return out


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = _ROOT.value
  try:
    if _CHECK.value:
      bad = stale(root)
      if bad:
        print("out of date (run python -m jaxvars.report.pages): " + ", ".join(bad),
              file=sys.stderr)
        sys.exit(1)
      print("every generated block is up to date")
      return
    for page in pages(root):
      with open(page) as f:
        text = f.read()
      new = regenerate(text, root)
      if new != text:
        atomic.write_text(page, new)
        print(f"written {page}")
  except JaxvarsError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
