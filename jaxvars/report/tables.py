"""The report's tables, as markdown lines, driven by what results.json contains.

Systems, attacks and conditions are read from ``results['ranking']`` and what each row is
from the row and condition records (:mod:`jaxvars.report.rows`), and labelled from
``results['systems']``; the paper's numbers (:mod:`jaxvars.report.paper`) appear where
this run has the same system and attack.
"""

from __future__ import annotations

import math

from jaxvars.conditions import CLEAN, UNBOUNDED, condition_key
from jaxvars.report import paper
from jaxvars.report.rows import records

METRICS = paper.METRICS


def fmt(x) -> str:
  """A table cell: 4 decimals, 'NaN' for a missing or NaN value."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "NaN"
  return f"{x:.4f}"


def cell(row: dict | None, metric: str) -> str:
  """``'0.1667 [0.0833, 0.2500]'``: a value and its 95% interval (where the row has one)."""
  if not row or row.get(metric) is None:
    return "NaN"
  ci = row.get("ci95", {}).get(metric)
  return fmt(row[metric]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def md_table(header, rows) -> list[str]:
  """A markdown table."""
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out


def conditions(results: dict) -> list[str]:
  """Every condition of ``results['ranking']`` (then of ``results['detection']``), in order
  of first appearance."""
  seen, rec = {}, records(results)
  for key in results.get("ranking", {}):
    seen.setdefault(rec.row(key).condition, None)
  for cond in results.get("detection", {}):
    seen.setdefault(cond, None)
  return list(seen)


def attacks(results: dict, *, paper_only: bool = False) -> list[str]:
  """The attack names (e.g. 'fgsm', 'pgd', 'pgd-feature') of the run, in order; with
  ``paper_only`` just the paper's transfer attacks (a method name alone: 'fgsm', 'pgd'), not
  the adaptive and sanity-check ones (which the robustness section reports)."""
  seen, rec = {}, records(results)
  for c in map(rec.condition, conditions(results)):
    if c.eps is not None and not (paper_only and not c.paper):
      seen.setdefault(c.family, None)
  return list(seen)


def at_eps(results: dict, attack: str, eps: float) -> str:
  """The condition of ``attack`` shown in a table at ``eps``: ``attack@eps``, or where the
  run has no such condition but has the attack unbounded (C&W as published, ``'cw@255'``),
  that one."""
  key = condition_key(attack, eps)
  unbounded = condition_key(attack, UNBOUNDED)
  have = set(conditions(results))
  return unbounded if key not in have and unbounded in have else key


def sweep_eps(results: dict, *, paper_only: bool = False) -> list[float]:
  """The attacked eps values of ``results['ranking']``, sorted (``paper_only``: of the paper's
  transfer attacks only, see :func:`attacks`)."""
  rec = records(results)
  return sorted({c.eps for c in map(rec.condition, conditions(results))
                 if c.eps is not None and not (paper_only and not c.paper)})


def report_eps(results: dict) -> float | None:
  """The eps of the main table: the ablation's eps (paper: 8) if swept, else the eps
  closest to 8; None for a clean-only run."""
  eps = sweep_eps(results, paper_only=True) or sweep_eps(results)
  if not eps:
    return None
  want = float(results.get("config", {}).get("ablation", {}).get("eps", 8.0))
  return min(eps, key=lambda e: (abs(e - want), e))


def systems(results: dict) -> list[str]:
  """The row names of the evaluated systems (not the most-popular baseline), in order."""
  return records(results).systems()


def baselines(results: dict) -> list[str]:
  """The row names of the most-popular baseline (scored on clean photos only), in order."""
  return records(results).systems(baselines=True)


def label(results: dict, row_name: str) -> str:
  """The printed name of a system's rows ('OURS-rand'; 'OURS + gate' for the rows of a
  system behind the detector's gate)."""
  gate_of = records(results).gate_of(row_name)
  if gate_of is not None:
    return label(results, gate_of) + " + gate"
  info = results.get("systems", {}).get(row_name)
  return (info or {}).get("label") or paper.DEFAULT_LABELS.get(row_name, row_name)


USER_GROUPS = {
    "ranking": "all test users (the paper's setting: the defence trained on the catalogue "
               "it is scored on)",
    "ranking_unseen": "users whose held-out item the defence never trained on (out of sample)",
    "ranking_seen": "users whose held-out item the defence trained on",
}


def main_table(results: dict, eps: float | None, *, section: str = "ranking",
               paper_columns: bool = True) -> list[str]:
  """Tables 2/3 layout at ``eps``: every metric with its 95% interval (bootstrap over the
  section's users), then the paper's Amazon Men numbers (whose eps the paper does not
  state)."""
  ranking = results.get(section, {})
  header = ["attack", "system"] + list(METRICS)
  if paper_columns:
    header += [f"paper {m} (eps not stated)" for m in METRICS]
  rows = []
  conds = [(CLEAN, CLEAN)] + ([] if eps is None else [
      (a, at_eps(results, a, eps)) for a in attacks(results, paper_only=True)])
  for attack, cond in conds:
    for name in baselines(results) * (cond == CLEAN) + systems(results):
      row = ranking.get(f"{name}/{cond}")
      if row is None:
        continue
      cells = [cond, label(results, name)] + [cell(row, m) for m in METRICS]
      if paper_columns:
        ref = paper.TABLE2.get(attack, {}).get(name)
        cells += [fmt(p) for p in ref] if ref else ["" for _ in METRICS]
      rows.append(cells)
  return md_table(header, rows)


def draws_table(results: dict, eps: float | None) -> list[str]:
  """The spread of the randomised systems over their draws (HR@10 and NDCG@10 of each draw:
  min and max), beside their mean in the main table."""
  rows = []
  conds = [CLEAN] + ([] if eps is None else [at_eps(results, a, eps)
                                             for a in attacks(results, paper_only=True)])
  for name in systems(results):
    for cond in conds:
      draws = results["ranking"].get(f"{name}/{cond}", {}).get("draws")
      if draws:
        rows.append([cond, label(results, name), len(draws["HR@10"])]
                    + [f"{fmt(min(draws[m]))} - {fmt(max(draws[m]))}" for m in ("HR@10", "NDCG@10")])
  return md_table(["condition", "system", "draws", "HR@10 range", "NDCG@10 range"], rows) if rows else []


def sweep_table(results: dict, metric: str = "HR@10") -> list[str]:
  """``metric`` (95% interval) of every system under the paper's attacks, by eps (Figure 6)."""
  ranking, eps = results["ranking"], sweep_eps(results, paper_only=True)
  header = ["system", "attack", "clean"] + [
      "unbounded" if e == UNBOUNDED else f"eps={e:g}" for e in eps]
  rows = []
  for name in systems(results):
    for attack in attacks(results, paper_only=True):
      cells = [ranking.get(f"{name}/{condition_key(attack, e)}") for e in eps]
      if all(c is None for c in cells):
        continue
      rows.append([label(results, name), attack.upper(),
                   cell(ranking.get(f"{name}/clean"), metric)] + [cell(c, metric) for c in cells])
  return md_table(header, rows)


def input_sweep_table(results: dict, eps: float | None, metric: str = "HR@10") -> list[str]:
  """AIP's section 7.2 layout: one row per setting of each swept input defence (JPEG quality,
  bit depth; results.json ``systems[row]['sweep']``), ``metric`` (95% interval over users) on
  clean photos and under each of the paper's transfer attacks at ``eps``; [] without a sweep."""
  swept = [(name, info["sweep"]) for name, info in results.get("systems", {}).items()
           if info.get("sweep")]
  if not swept:
    return []
  ranking = results.get("ranking", {})
  conds = [CLEAN] + ([] if eps is None else [condition_key(a, eps)
                                             for a in attacks(results, paper_only=True)])
  header = ["system", "setting"] + [f"{metric} {c}" for c in conds]
  rows = [[label(results, name), f"{sw['field']}={sw['value']}"]
          + [cell(ranking.get(f"{name}/{c}"), metric) for c in conds] for name, sw in swept]
  return md_table(header, rows)


def attack_table(results: dict) -> list[str]:
  """Size and crafting time of every attacked catalogue; where the run has a C&W attack, the
  share of photos it made adversarial (its others stay clean and count in the means)."""
  attacks_ = results.get("attack", {})
  cw = any("success_rate" in a for a in attacks_.values())
  header = (["condition", "mean L-inf (1/255)", "mean L2 ([0,1] pixels)", "crafting time (s)"]
            + ["adversarial (C&W)"] * cw)
  rows = [[cond, fmt(a["linf_255"]), fmt(a["l2"]), f"{a['time_s']:.0f}"]
          + ([fmt(a["success_rate"]) if "success_rate" in a else ""] if cw else [])
          for cond, a in attacks_.items()]
  return md_table(header, rows)
