"""The report's robustness section: every attack against every system with its threat model,
the worst case per system (robust HR@10), the detector-aware attacks' pass rates and gated
rankings, and Carlini et al.'s sanity checks. Where the attacks beyond the paper's perturbed
a subset of the held-out items, every number here is on the users whose held-out item they
perturbed (``results['ranking_attacked']``), the clean and transfer rows included."""

from __future__ import annotations

from jaxvars.conditions import CLEAN
from jaxvars.report.rows import records
from jaxvars.report.tables import cell, fmt, label, md_table, systems


def section_ranking(results: dict) -> dict:
  """The rows this section reads: on the attacked users where the item-subset attacks left
  some users' held-out item unattacked (``ranking_attacked``), else on all users."""
  return results.get("ranking_attacked") or results.get("ranking", {})


def _attack_info(results: dict, system: str, cond: str) -> dict:
  attack = results.get("attack", {})
  for key in (cond, f"{cond}@{results.get('systems', {}).get(system, {}).get('system', '')}"):
    if key in attack:
      return attack[key]
  return {}


def attack_rows(results: dict, eps: float) -> list[str]:
  """Conditions at ``eps`` that some system was ranked under, in order of appearance."""
  seen, rec = {}, records(results)
  for key in results.get("ranking", {}):
    if not rec.row(key).gated and rec.condition_of(key).eps == eps:
      seen.setdefault(rec.row(key).condition, None)
  return list(seen)


def worst_case_table(results: dict, eps: float) -> list[str]:
  """Attack x system: HR@10 (95% interval) of each system under each attack at ``eps``, the
  attack's threat model, and the per-user worst case over every attack (robust HR@10)."""
  rec = records(results)
  names = [n for n in systems(results) if rec.gate_of(n) is None]
  ranking, robust = section_ranking(results), results.get("robust", {})
  rows, legend = [], {}
  for cond in attack_rows(results, eps):
    info = next((_attack_info(results, n, cond) for n in names if f"{n}/{cond}" in ranking), {})
    short = info.get("threat") or rec.condition(cond).threat
    legend.setdefault(short, info.get("threat_model", rec.condition(cond).threat_model))
    rows.append([cond] + [cell(ranking.get(f"{n}/{cond}"), "HR@10") if f"{n}/{cond}" in ranking
                          else "" for n in names] + [short, info.get("items_attacked", "")])
  rows.append(["**worst case** (every attack above)"]
              + [cell(robust.get(n), "HR@10") if n in robust else "" for n in names] + ["", ""])
  rows.append(["clean (reference)"] + [cell(ranking.get(f"{n}/clean"), "HR@10") for n in names]
              + ["", ""])
  header = ["attack"] + [label(results, n) for n in names] + ["threat model", "items attacked"]
  notes = [""] + [f"* {short}: {full}" for short, full in legend.items() if full]
  return md_table(header, rows) + notes


def gated_table(results: dict) -> list[str]:
  """Detector-aware attacks: the share of attacked photos the detector passes, and HR@10
  with and without rejecting the flagged uploads (their items keep the clean photo)."""
  ranking, rows, rec = section_ranking(results), [], records(results)
  for key, row in ranking.items():
    r = rec.row(key)
    if not r.gated:
      continue
    base, cond = r.gate_of, r.condition
    info = _attack_info(results, base, cond)
    rows.append([cond, label(results, base), fmt(info.get("pass_rate")),
                 cell(ranking.get(rec.find(base, cond)), "HR@10"), cell(row, "HR@10"),
                 cell(ranking.get(rec.find(base, CLEAN)), "HR@10")])
  header = ["attack", "system", "attacked photos passing the detector",
            "HR@10 (all uploads accepted)", "HR@10 (flagged uploads rejected)", "HR@10 clean"]
  return md_table(header, rows) if rows else []


def _final_loss(results: dict, row: str):
  """The attack's mean objective at its last step (its ``loss_curve``), or None."""
  r = records(results).row(row)
  curve = _attack_info(results, r.system, r.condition).get("loss_curve") or []
  return curve[-1] if curve else None


def _steps_check(results: dict, key: str, comp: dict) -> str:
  """Carlini et al.'s more-steps check, one line: HR@10 of twice the steps minus the attack's,
  paired; the held-out items' mean rank the same way (every user, not only the top 10); the
  attack's own objective at its last step. HR@10 higher alone flags the defence as helped;
  HR@10 higher while the mean rank falls further reads as what it is: the longer attack is
  stronger on average yet lifts some held-out items into the top 10, because the objective it
  maximises (e.g. paper eq. 3's BPR loss of sampled training triplets, which also raises an
  item's score for non-buyers) is not HR@10."""
  hr, rank = comp["HR@10"], comp.get("mean_rank")
  line = (f"* twice the PGD steps: {key}: HR@10 {hr['diff']:+.4f} "
          f"[{hr['ci95'][0]:+.4f}, {hr['ci95'][1]:+.4f}]")
  if rank is not None:
    line += (f"; the held-out item's mean rank (0 = top) {rank['diff']:+.2f} "
             f"[{rank['ci95'][0]:+.2f}, {rank['ci95'][1]:+.2f}]")
  first, second = key.split(" - ")
  losses = _final_loss(results, first), _final_loss(results, second)
  if None not in losses:
    line += f"; the attack's own objective at its last step {losses[1]:.4g} -> {losses[0]:.4g}"
  stronger = rank is not None and rank["effect"] == "higher"
  if hr["effect"] != "higher":
    verdict = "no help to the defence" + (
        ": the longer attack pushes the held-out items further down" if stronger else "")
  elif stronger:
    verdict = ("**mixed**: the longer attack pushes the held-out items further down on "
               "average but lifts some into the top 10; its objective is not HR@10, and the "
               "worst case counts each user under whichever attack ranks their item lowest")
  else:
    verdict = "**more steps helped the defence**"
  return f"{line} ({verdict})"


def steps_pairs(results: dict) -> list[str]:
  """The comparison keys ``'<row> - <row>'`` of Carlini et al.'s more-steps check: each row of
  a sanity condition paired with an attack (``compare_with``) against the same system's row
  under that attack."""
  rec, out = records(results), []
  for c in rec.conditions:
    if c.kind != "sanity" or c.compare_with is None:
      continue
    for key in c.rows or [k for k, r in rec.rows.items() if r.condition == c.name]:
      r = rec.row(key)
      out.append(f"{key} - {rec.find(r.system, c.compare_with)}")
  return out


def sanity_checks(results: dict, eps: float) -> list[str]:
  """Carlini et al. (2019): larger eps and more steps never help the defended system; a
  large-eps white-box attack reaches about the no-visual level."""
  ranking, out, compared, rec = section_ranking(results), [], 0, records(results)
  for name in systems(results):
    sweep = sorted(((c.eps, c.family, r) for c, r in
                    ((rec.condition_of(k), r) for k, r in ranking.items()
                     if rec.row(k).system == name) if c.eps is not None),
                   key=lambda t: t[:2])
    by_attack = {}
    for e, attack, row in sweep:
      by_attack.setdefault(attack, []).append((e, row))
    for attack, points in by_attack.items():
      for (e1, r1), (e2, r2) in zip(points, points[1:]):
        compared += 1
        if r2["ci95"]["HR@10"][0] > r1["ci95"]["HR@10"][1]:
          out.append(f"* **violated**: {label(results, name)} under {attack.upper()} scores higher "
                     f"at eps {e2:g} ({fmt(r2['HR@10'])}) than at eps {e1:g} ({fmt(r1['HR@10'])}), "
                     "beyond both intervals")
  if not out and compared:
    out.append(f"* larger eps never scored measurably higher (no interval above the smaller "
               f"eps's) for any system and attack ({compared} pairs of neighbouring eps)")
  elif not compared:
    out.append("* the eps sweep check did not run: every attack was evaluated at one eps "
               "(the `full` preset sweeps eps)")
  comps, steps = results.get("comparisons", {}), set(steps_pairs(results))
  for key, comp in comps.items():
    if key in steps:
      out.append(_steps_check(results, key, comp["all"]))
  floor = rec.floor(ranking)
  for key, row in ranking.items():
    c, name = rec.condition_of(key), rec.row(key).system
    if c.kind == "sanity" and c.compare_with is None and floor is not None:
      out.append(f"* white-box {c.name} on {label(results, name)}: HR@10 {cell(row, 'HR@10')} vs "
                 f"the no-visual level {cell(floor, 'HR@10')} (every item's visual feature set "
                 "to the mean)")
  return out
