"""Both items of each triplet through the defence, before and after (issue 35, item 6): the
same preset trained and evaluated once per variant of ``config.defense.bpr_other`` (what
the joint loss's BPR term scores the other item j of each triplet with) and
``config.attack.whitebox_table`` (what the white-box attacks' objective reads as the other
items' features), then every ranking row of the runs side by side with its 95% interval
and the paired difference from the first variant on the same users.

  nice -n 19 python benchmarks/bpr_other.py --preset=cpu --root=/tmp/bpr_other \\
      --out=/tmp/bpr_other_cpu.json
  nice -n 19 python benchmarks/bpr_other.py --preset=cpu,hm \\
      --manual_dir=/work/shared/data/hm --root=/tmp/bpr_other --out=/tmp/bpr_other_hm.json
  python benchmarks/bpr_other.py --preset=cpu,hm --root=/tmp/bpr_other --norun  # table only

Variants (``--variants``, the first is the baseline of the paired differences):

* ``before``: ``bpr_other='clean'``, ``whitebox_table='clean'`` (jaxvars before issue 35);
* ``after``: ``bpr_other='defended'`` (both photos of the triplet through D, with the
  gradient: the paper's eq. 12), ``whitebox_table='deployed'`` (the attacked system's own
  features f(D(x)) of the other items);
* ``train_only`` / ``table_only``: one of the two changes alone;
* ``frozen``: ``bpr_other='defended_frozen'`` (f(D(x_j)) without its gradient) and the
  deployed table.

Each run is ``python -m jaxvars.main --config=configs/joint.py:<preset>
--workdir=<root>/<preset>/seed<seed>/<variant> --config.seed=<seed>`` with the variant's two
overrides (``--extra`` adds more); a finished workdir is resumed, not retrained. The
children inherit this process's niceness. The table reads each run's ``results.json``
(``ranking``: a subset attack's rows on the users whose held-out item it perturbed, as the
report's) and ``artifacts.npz`` (per-user ranks, for the paired differences), the worst
case per system (``robust``) and the defence stages' training seconds. Prints the table,
writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

VARIANTS = {  # name -> (config.defense.bpr_other, config.attack.whitebox_table)
    "before": ("clean", "clean"),
    "after": ("defended", "deployed"),
    "train_only": ("defended", "clean"),
    "table_only": ("clean", "deployed"),
    "frozen": ("defended_frozen", "deployed"),
}

_PRESET = flags.DEFINE_string("preset", "cpu", "Presets of configs/joint.py (cpu, cpu,hm, ...).")
_ROOT = flags.DEFINE_string("root", "/tmp/bpr_other", "Where the runs' workdirs go.")
_VARIANTS = flags.DEFINE_list("variants", ["before", "after"],
                              f"Variants to run and compare, baseline first: {list(VARIANTS)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "config.seed of the runs (one table per seed).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "config.data.manual_dir (H&M: its directory).")
_EXTRA = flags.DEFINE_list("extra", [], "More overrides for every run, e.g. eval.max_items=64.")
_RUN = flags.DEFINE_bool("run", True, "Run (or resume) the runs; --norun only compares.")
_METRIC = flags.DEFINE_string("metric", "HR@10", "The metric of the table.")
_OUT = flags.DEFINE_string("out", "bpr_other.json", "JSON output path.")


def workdir(seed: str, variant: str) -> str:
  return os.path.join(_ROOT.value, _PRESET.value.replace(",", "_"), f"seed{seed}", variant)


def command(seed: str, variant: str) -> list[str]:
  """The jaxvars.main command line of one run."""
  other, table = VARIANTS[variant]
  cmd = [sys.executable, "-m", "jaxvars.main", f"--config=configs/joint.py:{_PRESET.value}",
         f"--workdir={workdir(seed, variant)}", f"--config.seed={seed}",
         f"--config.defense.bpr_other={other}", f"--config.attack.whitebox_table={table}"]
  if _MANUAL_DIR.value:
    cmd.append(f"--config.data.manual_dir={_MANUAL_DIR.value}")
  return cmd + [f"--config.{o}" for o in _EXTRA.value]


def _load(path: str):
  import numpy as np  # noqa: PLC0415
  from jaxvars import workdir as wd  # noqa: PLC0415
  with open(wd.results_path(path)) as f:
    results = json.load(f)
  with np.load(wd.artifacts_path(path), allow_pickle=False) as z:
    artifacts = {k: np.asarray(z[k]) for k in z.files}
  return results, artifacts


def compare(runs: dict, metric: str) -> dict:
  """{'rows': {row: {variant: {'value', 'ci95', 'users', 'diff' (paired, vs the first
  variant; not for the first)}}}, 'robust': {system: {variant: {'value', 'ci95'}}},
  'stage_seconds': {variant: {stage: s}}} of ``runs`` {variant: (results, artifacts)}."""
  from jaxvars.evaluation import summary  # noqa: PLC0415
  from jaxvars.workdir import ranks_of  # noqa: PLC0415
  names = list(runs)
  base_results, base_art = runs[names[0]]
  cfg = base_results.get("config", {})
  ks = tuple(cfg.get("eval", {}).get("ks", (5, 10, 20)))
  kw = dict(resamples=int(cfg.get("eval", {}).get("bootstrap_resamples", 1000)),
            seed=int(cfg.get("eval", {}).get("bootstrap_seed", 0)))
  subset_rows = {r for c in base_results.get("conditions", []) if c.get("items") == "subset"
                 for r in c.get("rows", [])}
  ranks = {v: ranks_of(art) for v, (_, art) in runs.items()}
  out = {"rows": {}, "robust": {}, "stage_seconds": {}}
  for row in base_results.get("ranking", {}):
    if not all(row in r.get("ranking", {}) for r, _ in runs.values()):
      continue
    users = base_art.get("attacked_users") if row in subset_rows else None
    entry = {}
    for v, (results, _) in runs.items():
      r = results["ranking"][row]
      entry[v] = {"value": r[metric], "ci95": r["ci95"][metric], "users": r["users"]}
      if v != names[0] and row in ranks[v] and row in ranks[names[0]]:
        a, b = ranks[v][row], ranks[names[0]][row]
        if a.shape == b.shape:
          entry[v]["diff"] = summary.comparison(a, b, ks, users=users, metrics=(metric,),
                                                **kw)[metric]
    out["rows"][row] = entry
  for v, (results, _) in runs.items():
    for system, r in results.get("robust", {}).items():
      if metric in r:
        out["robust"].setdefault(system, {})[v] = {"value": r[metric],
                                                   "ci95": r.get("ci95", {}).get(metric)}
    timing = results.get("timing", {})
    out["stage_seconds"][v] = {k: t for k, t in timing.items()
                               if isinstance(t, (int, float)) and k.startswith("stage_")}
  return out


def _cell(d: dict | None) -> str:
  if not d:
    return ""
  ci = d.get("ci95")
  return f"{d['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _diff(d: dict | None) -> str:
  if not d:
    return ""
  lo, hi = d["ci95"]
  return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if d.get("effect") not in
                                                      (None, "none") else "")


def print_table(seed: str, table: dict, metric: str) -> None:
  names = [v for v in _VARIANTS.value]
  header = ["row"] + [f"{v} {metric}" for v in names] + [f"{v} - {names[0]}" for v in names[1:]]
  lines = [header]
  for row, entry in table["rows"].items():
    lines.append([row] + [_cell(entry.get(v)) for v in names]
                 + [_diff(entry.get(v, {}).get("diff")) for v in names[1:]])
  for system, entry in table["robust"].items():
    lines.append([f"{system}/worst case"] + [_cell(entry.get(v)) for v in names]
                 + [""] * (len(names) - 1))
  widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
  print(f"\nseed {seed}, {_PRESET.value}: {metric} (95% interval); paired difference vs "
        f"{names[0]} on the same users (* its interval excludes 0)")
  for r in lines:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
  for v, secs in table["stage_seconds"].items():
    if secs:
      print(f"{v}: " + ", ".join(f"{k}={s:.0f}s" for k, s in secs.items()))


def main(argv):
  del argv
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"unknown variant(s) {sorted(unknown)}; expected {list(VARIANTS)}")
  out = {"preset": _PRESET.value, "variants": {v: dict(zip(("bpr_other", "whitebox_table"),
                                                           VARIANTS[v]))
                                               for v in _VARIANTS.value},
         "extra": list(_EXTRA.value), "metric": _METRIC.value, "seeds": {}, "commands": {}}
  for seed in _SEEDS.value:
    for v in _VARIANTS.value:
      cmd = command(seed, v)
      out["commands"][f"{seed}/{v}"] = " ".join(cmd)
      if _RUN.value:
        print("+", " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        out.setdefault("wall_s", {})[f"{seed}/{v}"] = time.perf_counter() - t
    runs = {v: _load(workdir(seed, v)) for v in _VARIANTS.value}
    out["seeds"][seed] = compare(runs, _METRIC.value)
    print_table(seed, out["seeds"][seed], _METRIC.value)
  try:
    from jaxvars import provenance  # noqa: PLC0415
    out["provenance"] = provenance.describe()
  except ImportError:
    pass
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
