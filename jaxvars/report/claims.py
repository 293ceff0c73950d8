"""What a run shows, said only as far as its intervals allow: every claim is a paired
difference whose 95% interval excludes 0 ('hurts' / 'helps'), or 'no measurable change'.

Also the ablation table (Table 5 layout) with each variant's paired difference against the
unmodified system on the same users.
"""

from __future__ import annotations

from jaxvars.conditions import UNBOUNDED, condition_key
from jaxvars.report import paper
from jaxvars.report.tables import at_eps, attacks, cell, fmt, label, md_table, systems

VERDICT = {"higher": "helps", "lower": "hurts", "none": "no measurable change"}


def _diff(c: dict, metric: str = "HR@10") -> str:
  d = c[metric]
  return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def claims(results: dict, eps: float | None) -> list[str]:
  """One line per comparison at ``eps`` (attacks vs clean, defences vs the undefended
  system), all users and out-of-sample users, read from ``results['comparisons']``."""
  comps, out = results.get("comparisons", {}), []
  if eps is None or not comps:
    return out
  names = systems(results)
  wanted = []
  conds = [at_eps(results, a, eps) for a in attacks(results)]
  shown = [f"{a.upper()}@{UNBOUNDED if c == condition_key(a, UNBOUNDED) else eps:g}"
           for a, c in zip(attacks(results), conds)]
  for name in names:
    wanted += [(f"{name}/{cond} - {name}/clean", f"{what} on {label(results, name)}")
               for what, cond in zip(shown, conds)]
  for name in names[1:]:
    for cond in ["clean"] + conds:
      wanted.append((f"{name}/{cond} - {names[0]}/{cond}",
                     f"{label(results, name)} vs {label(results, names[0])} on {cond}"))
  for key, what in wanted:
    if key not in comps:
      continue
    c = comps[key]
    effect = c["all"]["HR@10"]["effect"]
    verb = {"higher": "raises", "lower": "lowers", "none": "does not measurably change"}[effect]
    out.append(f"* {what}: {verb} HR@10, {_diff(c['all'])} (all users); "
               f"{_diff(c['unseen'])} out of sample ({c['unseen']['HR@10']['effect']})")
  return out


def ablation_rows(results: dict) -> list[tuple[str, str, dict]]:
  """(name, paper label, row) for the unmodified system and every ablation: the row has the
  detection accuracy of the ablation's attack and the defended systems' ranking rows."""
  abl = results.get("ablations") or {}
  if not abl:
    return []
  cfg = results.get("config", {}).get("ablation", {})
  attack = tuple(cfg.get("attacks", ("pgd",)))[-1]
  cond = condition_key(attack, float(cfg.get("eps", 8.0)))

  def row(res):
    det = (res.get("detection") or {}).get(cond)
    return {"detection": det, "cond": cond, "comparisons": res.get("comparisons", {}),
            "diverged": res.get("diverged"), "fidelity": res.get("fidelity") or {},
            **{name: (res.get("ranking") or {}).get(f"{name}/{cond}") for name in
               ("defended", "defended_rand")}}

  rows = [("unmodified", "unmodified architecture", row(results))]
  rows += [(name, paper.ABLATION_NAMES.get(name, ""), row(res)) for name, res in abl.items()]
  return rows


def ablation_table(results: dict) -> list[str]:
  """Table 5 layout: detection accuracy, NDCG@10, HR@10 under the ablation's attack (95%
  intervals), the paired HR@10 difference (rand) to the unmodified system, the paper's row
  (whose eps the paper does not state)."""
  rows = []
  for name, paper_label, r in ablation_rows(results):
    ref = paper.TABLE5.get(paper_label)
    paper_cells = [fmt(p) for p in ref] if ref else ["", "", ""]
    if r["diverged"]:
      rows.append([name, "training diverged (no defence to evaluate)"] + [""] * 6 + paper_cells)
      continue
    diff = r["comparisons"].get(f"defended_rand/{r['cond']}")
    acc = cell(r["detection"], "accuracy") if r["detection"] else "NaN"
    psnr = r["fidelity"].get("clean")
    rows.append([name, acc, cell(r["defended_rand"], "NDCG@10"),
                 cell(r["defended_rand"], "HR@10"), cell(r["defended"], "NDCG@10"),
                 cell(r["defended"], "HR@10"),
                 (f"{_diff(diff)} ({VERDICT[diff['HR@10']['effect']]})" if diff else ""),
                 cell(psnr, "psnr") if psnr else ""] + paper_cells)
  header = ["variant", "accuracy", "NDCG@10 (rand)", "HR@10 (rand)", "NDCG@10", "HR@10",
            "HR@10 (rand) vs unmodified", "PSNR D(clean), dB", "paper accuracy",
            "paper NDCG@10", "paper HR@10"]
  return md_table(header, rows)


def ablation_claims(results: dict) -> list[str]:
  """One line per ablation: does removing the part hurt (interval of the paired HR@10
  difference of OURS-rand, and of detection accuracy where both have it)?"""
  rows, out = ablation_rows(results), []
  if not rows:
    return out
  base = rows[0][2]
  for name, _, r in rows[1:]:
    if r["diverged"]:
      out.append(f"* ablation {name}: **training diverged**, so it has no defence to "
                 f"evaluate ({r['diverged'].split(';')[0]})")
      continue
    diff = r["comparisons"].get(f"defended_rand/{r['cond']}")
    if diff:
      out.append(f"* ablation {name}: HR@10 (rand) {_diff(diff)} vs unmodified: "
                 f"**{VERDICT[diff['HR@10']['effect']]}** (removing it "
                 f"{'hurts' if diff['HR@10']['effect'] == 'lower' else 'does not measurably hurt' if diff['HR@10']['effect'] == 'none' else 'helps'})")
    if r["detection"] and base["detection"]:
      a, b = r["detection"], base["detection"]
      overlap = not (a["ci95"]["accuracy"][1] < b["ci95"]["accuracy"][0]
                     or b["ci95"]["accuracy"][1] < a["ci95"]["accuracy"][0])
      out.append(f"  detection accuracy {fmt(a['accuracy'])} vs {fmt(b['accuracy'])}"
                 f"{' (intervals overlap: no measurable change)' if overlap else ''}")
  return out
