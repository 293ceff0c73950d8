"""The report's tables, as markdown lines, driven by what results.json contains.

Systems, attacks and conditions are read from ``results['ranking']`` (rows
``<system>/<condition>``, :mod:`jaxvars.conditions`) and labelled from
``results['systems']``; the paper's numbers (:mod:`jaxvars.report.paper`) appear where
this run has the same system and attack.
"""

from __future__ import annotations

import math

from jaxvars.conditions import CLEAN, condition_key, parse_condition, parse_row_key
from jaxvars.report import paper

METRICS = paper.METRICS


def fmt(x) -> str:
  """A table cell: 4 decimals, 'NaN' for a missing or NaN value."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "NaN"
  return f"{x:.4f}"


def md_table(header, rows) -> list[str]:
  """A markdown table."""
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out


def conditions(results: dict) -> list[str]:
  """Every condition of ``results['ranking']`` (then of ``results['detection']``), in order
  of first appearance."""
  seen = {}
  for key in results.get("ranking", {}):
    seen.setdefault(parse_row_key(key)[1], None)
  for cond in results.get("detection", {}):
    seen.setdefault(cond, None)
  return list(seen)


def attacks(results: dict) -> list[str]:
  """The attack names (e.g. 'fgsm', 'pgd', 'pgd-feature') of the run, in order."""
  seen = {}
  for cond in conditions(results):
    name, eps = parse_condition(cond)
    if eps is not None:
      seen.setdefault(name, None)
  return list(seen)


def sweep_eps(results: dict) -> list[float]:
  """The attacked eps values of ``results['ranking']``, sorted."""
  return sorted({eps for _, eps in map(parse_condition, conditions(results)) if eps is not None})


def report_eps(results: dict) -> float | None:
  """The eps of the main table: the ablation's eps (paper: 8) if swept, else the eps
  closest to 8; None for a clean-only run."""
  eps = sweep_eps(results)
  if not eps:
    return None
  want = float(results.get("config", {}).get("ablation", {}).get("eps", 8.0))
  return min(eps, key=lambda e: (abs(e - want), e))


def systems(results: dict) -> list[str]:
  """The row names of the evaluated systems (not the most-popular baseline), in order."""
  seen = {}
  for key in results.get("ranking", {}):
    name = parse_row_key(key)[0]
    if name != "mostpop":
      seen.setdefault(name, None)
  return list(seen)


def label(results: dict, row_name: str) -> str:
  """The printed name of a system's rows ('OURS-rand')."""
  info = results.get("systems", {}).get(row_name)
  return (info or {}).get("label") or paper.DEFAULT_LABELS.get(row_name, row_name)


def main_table(results: dict, eps: float | None) -> list[str]:
  """Tables 2/3 layout at ``eps``: ours, then the paper's Amazon Men numbers."""
  ranking = results["ranking"]
  header = ["attack", "system"] + list(METRICS) + [f"paper {m}" for m in METRICS]
  rows = []
  conds = [(CLEAN, CLEAN)] + ([] if eps is None else
                              [(a, condition_key(a, eps)) for a in attacks(results)])
  for attack, cond in conds:
    for name in systems(results):
      row = ranking.get(f"{name}/{cond}")
      if row is None:
        continue
      ref = paper.TABLE2.get(attack, {}).get(name)
      rows.append([cond, label(results, name)] + [fmt(row[m]) for m in METRICS]
                  + ([fmt(p) for p in ref] if ref else ["" for _ in METRICS]))
  if "mostpop/clean" in ranking:
    rows.append(["clean", "MostPop"] + [fmt(ranking["mostpop/clean"][m]) for m in METRICS]
                + ["" for _ in METRICS])
  return md_table(header, rows)


def sweep_table(results: dict, metric: str = "HR@10") -> list[str]:
  """``metric`` of every system under every attack, by eps (the numbers of Figure 6)."""
  ranking, eps = results["ranking"], sweep_eps(results)
  header = ["system", "attack", "clean"] + [f"eps={e:g}" for e in eps]
  rows = []
  for name in systems(results):
    for attack in attacks(results):
      cells = [ranking.get(f"{name}/{condition_key(attack, e)}", {}).get(metric) for e in eps]
      if all(c is None for c in cells):
        continue
      rows.append([label(results, name), attack.upper(),
                   fmt(ranking.get(f"{name}/clean", {}).get(metric))] + [fmt(c) for c in cells])
  return md_table(header, rows)


def detection_table(results: dict) -> list[str]:
  """Table 4 layout: detection accuracy (and ROC AUC) by eps, with the paper's row."""
  det, eps = results.get("detection", {}), sweep_eps(results)
  header = ["attack", "metric"] + [f"eps={e:g}" for e in eps]
  rows = []
  for attack in attacks(results):
    for metric in ("accuracy", "roc_auc"):
      rows.append([attack.upper(), metric]
                  + [fmt(det.get(condition_key(attack, e), {}).get(metric)) for e in eps])
  rows.append(["paper (Amazon Men, OURS)", "accuracy"]
              + [fmt(paper.TABLE4[int(e)]) if e == int(e) and int(e) in paper.TABLE4 else ""
                 for e in eps])
  return md_table(header, rows)


def confusion_table(results: dict, eps: float) -> list[str]:
  """Figure 10 as a table: the detector's confusion matrix at the calibrated threshold
  (held-out items, each clean and attacked)."""
  rows = []
  for attack in attacks(results):
    d = results.get("detection", {}).get(condition_key(attack, eps))
    if not d:
      continue
    n = int(d["items"])
    tp, fp = round(d["tpr_at_threshold"] * n), round(d["fpr_at_threshold"] * n)
    rows.append([f"{attack.upper()}@{eps:g}", n - fp, fp, n - tp, tp])
  header = ["attack", "clean -> clean", "clean -> flagged", "attacked -> clean",
            "attacked -> flagged"]
  return md_table(header, rows)


def attack_table(results: dict) -> list[str]:
  """Size and crafting time of every attacked catalogue."""
  header = ["condition", "mean L-inf (1/255)", "mean L2 ([0,1] pixels)", "crafting time (s)"]
  rows = [[cond, fmt(a["linf_255"]), fmt(a["l2"]), f"{a['time_s']:.0f}"]
          for cond, a in results.get("attack", {}).items()]
  return md_table(header, rows)


def ablation_rows(results: dict) -> list[tuple[str, str, dict]]:
  """(label, paper label, row) for the unmodified system and every ablation: the row has
  'accuracy' (detection of the ablation's attack), and OURS / OURS-rand HR@10, NDCG@10."""
  abl = results.get("ablations") or {}
  if not abl:
    return []
  cfg = results.get("config", {}).get("ablation", {})
  attack = tuple(cfg.get("attacks", ("pgd",)))[-1]
  cond = condition_key(attack, float(cfg.get("eps", 8.0)))

  def row(ranking, detection):
    out = {"accuracy": detection.get(cond, {}).get("accuracy", math.nan)}
    for name in ("defended", "defended_rand"):
      for m in ("HR@10", "NDCG@10"):
        out[f"{name}/{m}"] = ranking.get(f"{name}/{cond}", {}).get(m, math.nan)
    return out

  rows = [("unmodified", "unmodified architecture",
           row(results["ranking"], results.get("detection", {})))]
  for name, res in abl.items():
    rows.append((name, paper.ABLATION_NAMES.get(name, ""),
                 row(res["ranking"], res.get("detection", {}))))
  return rows


def ablation_table(results: dict) -> list[str]:
  """Table 5 layout: detection accuracy, NDCG@10, HR@10 under the ablation's attack."""
  rows = []
  for name, paper_label, r in ablation_rows(results):
    ref = paper.TABLE5.get(paper_label)
    rows.append([name, fmt(r["accuracy"]), fmt(r["defended_rand/NDCG@10"]),
                 fmt(r["defended_rand/HR@10"]), fmt(r["defended/NDCG@10"]),
                 fmt(r["defended/HR@10"])]
                + ([fmt(p) for p in ref] if ref else ["", "", ""]))
  header = ["variant", "accuracy", "NDCG@10 (rand)", "HR@10 (rand)", "NDCG@10", "HR@10",
            "paper accuracy", "paper NDCG@10", "paper HR@10"]
  return md_table(header, rows)


def claims(results: dict, eps: float | None) -> list[str]:
  """The paper's claims at ``eps``, checked on this run (the targets of the full recipe)."""
  if eps is None:
    return []
  r, det = results["ranking"], results.get("detection", {})
  out = []
  undefended = systems(results)[0] if systems(results) else None
  clean = r.get(f"{undefended}/clean", {}).get("HR@10")

  def ratio(key, need, what):
    if key in r and clean:
      v = r[key]["HR@10"] / clean
      out.append(f"* {what}: {r[key]['HR@10']:.4f} = {100 * v:.1f}% of "
                 f"{label(results, undefended)}'s clean HR@10 {clean:.4f} (target >= "
                 f"{100 * need:.0f}%): **{'met' if v >= need else 'missed'}**")

  ratio(f"defended/fgsm@{eps:g}", 0.90, f"defended HR@10 under FGSM@{eps:g}")
  ratio(f"defended_rand/pgd@{eps:g}", 0.64, f"defended + rand HR@10 under PGD@{eps:g}")
  big = [(c, d["accuracy"]) for c, d in det.items() if parse_condition(c)[1] >= 16]
  if big:
    worst = min(big, key=lambda x: x[1])
    out.append(f"* detection accuracy for eps >= 16: minimum {worst[1]:.4f} ({worst[0]}) "
               f"(target >= 0.90): **{'met' if worst[1] >= 0.90 else 'missed'}**")
  rows = ablation_rows(results)
  if rows:
    base = rows[0][2]
    for name, _, row in rows[1:]:
      d_hr = round(row["defended_rand/HR@10"] - base["defended_rand/HR@10"], 6)
      d_acc = round(row["accuracy"] - base["accuracy"], 6)
      hurt = d_hr < 0 or (not math.isnan(d_acc) and d_acc < 0)
      out.append(f"* ablation {name}: HR@10 (rand) {d_hr:+.4f}, detection accuracy "
                 f"{'n/a' if math.isnan(d_acc) else f'{d_acc:+.4f}'} vs unmodified: "
                 f"**{'hurts' if hurt else 'does not hurt'}**")
  return out
