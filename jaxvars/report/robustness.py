"""The report's robustness section: every attack against every system with its threat model,
the worst case per system (robust HR@10), the detector-aware attacks' pass rates and gated
rankings, and Carlini et al.'s sanity checks. Where the attacks beyond the paper's perturbed
a subset of the held-out items, every number here is on the users whose held-out item they
perturbed (``results['ranking_attacked']``), the clean and transfer rows included."""

from __future__ import annotations

from jaxvars.conditions import parse_condition, parse_row_key
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
  seen = {}
  for key in results.get("ranking", {}):
    name, cond = parse_row_key(key)
    if "+gate" not in name and parse_condition(cond)[1] == eps:
      seen.setdefault(cond, None)
  return list(seen)


def worst_case_table(results: dict, eps: float) -> list[str]:
  """Attack x system: HR@10 (95% interval) of each system under each attack at ``eps``, the
  attack's threat model, and the per-user worst case over every attack (robust HR@10)."""
  names = [n for n in systems(results) if "+gate" not in n]
  ranking, robust = section_ranking(results), results.get("robust", {})
  rows, legend = [], {}
  for cond in attack_rows(results, eps):
    info = next((_attack_info(results, n, cond) for n in names if f"{n}/{cond}" in ranking), {})
    short = info.get("threat") or ("transfer" if "-wb" not in cond else "white-box")
    legend.setdefault(short, info.get("threat_model", ""))
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
  ranking, rows = section_ranking(results), []
  for key, row in ranking.items():
    name, cond = parse_row_key(key)
    if not name.endswith("+gate"):
      continue
    base = name.removesuffix("+gate")
    info = _attack_info(results, base, cond)
    rows.append([cond, label(results, base), fmt(info.get("pass_rate")),
                 cell(ranking.get(f"{base}/{cond}"), "HR@10"), cell(row, "HR@10"),
                 cell(ranking.get(f"{base}/clean"), "HR@10")])
  header = ["attack", "system", "attacked photos passing the detector",
            "HR@10 (all uploads accepted)", "HR@10 (flagged uploads rejected)", "HR@10 clean"]
  return md_table(header, rows) if rows else []


def _final_loss(results: dict, row: str):
  """The attack's mean objective at its last step (its ``loss_curve``), or None."""
  name, cond = parse_row_key(row)
  curve = _attack_info(results, name, cond).get("loss_curve") or []
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


def sanity_checks(results: dict, eps: float) -> list[str]:
  """Carlini et al. (2019): larger eps and more steps never help the defended system; a
  large-eps white-box attack reaches about the no-visual level."""
  ranking, out, compared = section_ranking(results), [], 0
  for name in systems(results):
    sweep = sorted((parse_condition(parse_row_key(k)[1])[1], parse_condition(parse_row_key(k)[1])[0], r)
                   for k, r in ranking.items() if parse_row_key(k)[0] == name
                   and parse_condition(parse_row_key(k)[1])[1] is not None)
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
  comps = results.get("comparisons", {})
  for key, comp in comps.items():
    first, second = key.split(" - ")
    if "-2xsteps@" in first and "-2xsteps" not in second and not second.endswith("/clean"):
      out.append(_steps_check(results, key, comp["all"]))
  floor = next((r for k, r in ranking.items() if k.endswith("/no_visual")), None)
  for key, row in ranking.items():
    name, cond = parse_row_key(key)
    attack, e = parse_condition(cond)
    if e == 64 and "-wb" in attack and floor is not None:
      out.append(f"* white-box {cond} on {label(results, name)}: HR@10 {cell(row, 'HR@10')} vs "
                 f"the no-visual level {cell(floor, 'HR@10')} (every item's visual feature set "
                 "to the mean)")
  return out
