"""The report's recommender-family table (paper Tables 2-3): each recommender of the run
undefended, AMR, OURS and OURS-rand in front of the defence recommender, under clean photos,
each transfer attack (crafted against the recommender it attacks) and their worst case, with
the paper's Amazon Men and Amazon Fashion numbers beside ours. Read from results.json's
``recommenders`` section (:mod:`jaxvars.families`)."""

from __future__ import annotations

from jaxvars.conditions import CLEAN
from jaxvars.report import paper
from jaxvars.report.tables import cell, fmt, md_table

_SYSTEM_LABELS = {"defended": "OURS", "defended_rand": "OURS-rand"}
_PAPER_FAMILIES = {"vbpr": "VBPR", "dvbpr": "DVBPR"}  # Our recommender -> the paper's block.
# AMR on a family: our name -> the family it is trained on (its row follows that family's).
_AMR_ON = {"amr": "vbpr", "amr_dvbpr": "dvbpr"}
WORST = "worst case"


def _rows(sec: dict) -> list[tuple[str, str, str]]:
  """(label, recommender, system) of each row of the table, in the paper's order: the
  defence recommender, AMR, OURS, OURS-rand, then every other recommender (and the defence
  in front of it)."""
  main, labels = sec["defense_recommender"], sec.get("labels", {})
  names = list(sec["names"])
  others = [n for n in names if n != main]
  # An AMR whose family is in the run sits right after that family's undefended row.
  amr_of = {base: n for n, base in _AMR_ON.items() if n in names and base in names}
  rows = [(labels.get(main, main), main, "undefended")]
  if main in amr_of:
    rows.append((labels.get(amr_of[main], amr_of[main]), amr_of[main], "undefended"))
  rows += [(_SYSTEM_LABELS[s], main, s) for s in ("defended", "defended_rand")]
  placed = {amr_of[main]} if main in amr_of else set()
  for n in others:
    if n not in placed:
      rows.append((labels.get(n, n), n, "undefended"))
    if n in amr_of and amr_of[n] not in placed:
      rows.append((labels.get(amr_of[n], amr_of[n]), amr_of[n], "undefended"))
      placed.add(amr_of[n])
    rows += [(f"{_SYSTEM_LABELS[s]} ({labels.get(n, n)})", n, s)
             for s in ("defended", "defended_rand")]
  return rows


def _paper(dataset: str, attack: str | None, rec: str, system: str):
  """The paper's HR@10 and NDCG@10 of that row under ``attack`` ('clean', 'fgsm', 'pgd': a
  condition record's method; None where the paper has none): a family's row (VBPR, DVBPR,
  OURS and OURS-rand in front of it) from that family's block, AMR on a family (undefended)
  from the block's AMR row."""
  if attack is None:
    return None
  if rec in _PAPER_FAMILIES:
    family, key = _PAPER_FAMILIES[rec], system
  elif rec in _AMR_ON and system == "undefended":
    family, key = _PAPER_FAMILIES[_AMR_ON[rec]], "amr"
  else:
    return None
  block = paper.TABLES23[dataset].get(family, {}).get(attack)
  ref = block.get(key) if block else None
  return None if ref is None else (ref[paper.METRICS.index("HR@10")],
                                   ref[paper.METRICS.index("NDCG@10")])


def family_table(results: dict) -> list[str]:
  """The table's markdown lines ([] where the run evaluated one recommender)."""
  sec = results.get("recommenders") or {}
  if not sec.get("rows"):
    return []
  conds = list(dict.fromkeys(k.split("/", 2)[2] for k in sec["rows"]))
  conds = [c for c in conds if c == CLEAN] + [c for c in conds if c != CLEAN] + [WORST]
  header = ["condition", "system", "HR@10", "NDCG@10",
            "paper Men HR@10 / NDCG@10", "paper Fashion HR@10 / NDCG@10"]
  # The attack method of each condition, from the run's condition records (never its name).
  attack_of = {c["name"]: (CLEAN if c.get("kind") == "clean" else c.get("attack"))
               for c in results.get("conditions", [])}
  out = []
  for cond in conds:
    for label, rec, system in _rows(sec):
      row = (sec.get("robust", {}).get(f"{rec}/{system}") if cond == WORST
             else sec["rows"].get(f"{rec}/{system}/{cond}"))
      if row is None:
        continue
      attack = None if cond == WORST else attack_of.get(cond)
      refs = [_paper(d, attack, rec, system) for d in paper.TABLES23]
      out.append([cond, label, cell(row, "HR@10"), cell(row, "NDCG@10")]
                 + [f"{fmt(r[0])} / {fmt(r[1])}" if r else "" for r in refs])
  return md_table(header, out)


def caption(results: dict) -> str:
  """What the table's rows are, in one paragraph."""
  sec = results["recommenders"]
  labels = sec.get("labels", {})
  main = labels.get(sec["defense_recommender"], sec["defense_recommender"])
  return (f"The defence (OURS: the denoiser; OURS-rand: rand(D(x))) was trained once, against "
          f"{main}, and is deployed unchanged in front of every recommender; each attack is "
          "crafted against the recommender it attacks (white-box to it, transferred through "
          "the defence), on every item. AMR is the adversarially trained recommender (its "
          "own row). The worst case counts a user as a hit only if the held-out item stays in "
          f"the top 10 under every attack of the table at eps = {sec.get('eps', 8):g}. "
          "A recommender without a visual term (BPR-MF) is only ranked on clean photos: no "
          "photo can move it. The paper's numbers are Amazon Men (Table 2) and Fashion "
          "(Table 3), from the block of each row's family (VBPR, DVBPR; AMR from its "
          "family's AMR row); our OURS (DVBPR) is the defence trained against the defence "
          "recommender, deployed in front of DVBPR. Brackets: 95% bootstrap intervals over users.")


def comparison_lines(results: dict, metric: str = "HR@10") -> list[str]:
  """The paired differences of the section (each defended row against its recommender
  undefended; each other recommender against the defence recommender undefended and
  defended), one bullet each, with their verdicts."""
  sec = results.get("recommenders") or {}
  labels = sec.get("labels", {})

  def name(key):
    rec, system, cond = key.split("/", 2)
    lab = labels.get(rec, rec)
    return (f"{_SYSTEM_LABELS[system]} ({lab})" if system in _SYSTEM_LABELS else lab), cond

  out = []
  for key, comp in sec.get("comparisons", {}).items():
    a, b = key.split(" - ")
    (la, cond), (lb, _) = name(a), name(b)
    d = comp.get(metric)
    if d is None:
      continue
    effect = d.get("effect", "none")
    verdict = "no measurable difference" if effect == "none" else f"an effect: {effect}"
    out.append(f"* {cond}: {la} - {lb}: {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, "
               f"{d['ci95'][1]:+.4f}] ({verdict})")
  return out


def feature_attack_lines(results: dict, metric: str = "HR@10") -> list[str]:
  """The section's feature-space attack (Tang et al.'s, the one AMR trains on): each
  recommender's ``metric`` under it, its drop from clean, and AMR against the defence
  recommender, paired; [] where the run has none."""
  sec = results.get("recommenders") or {}
  fa = sec.get("feature_attack")
  if not fa:
    return []
  labels = sec.get("labels", {})
  out = [f"Feature-space attack (white-box on the item features, not the photos; Tang et al. "
         f"2020's fast-gradient perturbation of the training BPR loss, L2 {fa['eps']:g} per "
         f"item in the units of each recommender's item features: the backbone's normalised "
         f"features, or DVBPR's own CNN embedding; the eps AMR trains with), {metric}:", ""]
  for name, row in fa["rows"].items():
    line = f"* {labels.get(name, name)}: {cell(row, metric)}"
    for key, comp in fa["comparisons"].items():
      if key.startswith(f"{name} - {name}/"):
        d = comp[metric]
        line += f"; minus clean {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
    out.append(line)
  for key, comp in fa["comparisons"].items():
    a, b = key.split(" - ")
    if "/" not in b:
      d = comp[metric]
      out.append(f"* {labels.get(a, a)} - {labels.get(b, b)} under the attack: "
                 f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
  return out
