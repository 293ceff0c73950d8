"""What each ranking row and condition of a run is, for the report: read from results.json's
records (``results['rows']``, ``results['conditions']``), never from the row names.

  rec = rows.records(results)
  r = rec.row("defended+gate/pgd-wb-det1@8")   # Row(system, condition, gate_of, ...)
  c = rec.condition_of(r.key)                  # Condition(kind='whitebox', eps=8.0, ...)

A results.json written before those sections existed (the committed runs under
``results/runs/`` among them) is read the same way: its records are derived once from the row
names (:func:`legacy_row`, :func:`legacy_condition`). That derivation is the only place in
the report that parses a name. A row key or condition the records do not list (an ablation's
row, a hand-written dict) is derived the same way.

Condition kinds (``Condition.kind``):

* ``clean``: the photos as uploaded;
* ``transfer``: the paper's attacks, crafted on the undefended recommender, every system
  ranked;
* ``adaptive``: stronger objectives (``bpr_all``, ``feature``, ``demote``), transferred;
* ``whitebox``: crafted through a defended system (``through``), detector-aware ones
  included (``gated``);
* ``sanity``: Carlini et al.'s checks: twice the steps (``compare_with``: the attack it
  repeats) and the large-eps attack (``compare_with`` None), scored against the floor;
* ``floor``: ``no_visual``, every item's visual feature zero;
* ``targeted``: targeted promotion (no ranking rows).
"""

from __future__ import annotations

import dataclasses
import re

from jaxvars.conditions import CLEAN, condition_key, parse_condition, parse_row_key

# The most-popular baseline's system name (clean only; not one of results['systems']).
MOSTPOP = "mostpop"
# The system-name suffix of a legacy gated row ('defended+gate').
_GATE = "+gate"
_FLOOR = "no_visual"
KINDS = ("clean", "transfer", "adaptive", "whitebox", "sanity", "floor", "targeted")
# Sections whose keys are row keys.
ROW_SECTIONS = ("ranking", "ranking_attacked", "ranking_unseen", "ranking_seen", "ranking_full")


@dataclasses.dataclass(frozen=True)
class Row:
  """A ranking row: ``system`` (its system name as in the key), ``condition`` (the name of
  its condition) and, for a row scored with the detector's gate, ``gate_of`` (the ungated
  system's name)."""
  key: str
  system: str
  condition: str
  gate_of: str | None = None
  baseline: bool = False  # The most-popular baseline (no photos: clean only).

  @property
  def gated(self) -> bool:
    return self.gate_of is not None


@dataclasses.dataclass(frozen=True)
class Condition:
  """A condition record (docs/results-json.md, ``conditions``). ``family``: the attack
  without its budget (the same family at several eps is an eps sweep; e.g. 'pgd-wb'); ``eot``:
  the EOT draws of a white-box attack on a randomised system, or None."""
  name: str
  kind: str
  attack: str | None = None
  objective: str | None = None
  eps: float | None = None
  through: str | None = None
  threat: str = ""
  threat_model: str = ""
  items: str = "all"
  gated: bool = False
  compare_with: str | None = None
  rows: tuple[str, ...] = ()
  family: str = ""
  eot: int | None = None

  @property
  def paper(self) -> bool:
    """One of the paper's transfer attacks (Tables 2/3, the eps sweep, detection)."""
    return self.kind == "transfer"


# ---- The legacy derivation: the only place a name is parsed ---------------------------------

def legacy_row(key: str) -> Row:
  """A row record from its key alone: ``'<system>[+gate]/<condition>'``."""
  system, condition = parse_row_key(key)
  gate_of = system[:-len(_GATE)] if system.endswith(_GATE) else None
  return Row(key, system, condition, gate_of, baseline=system == MOSTPOP)


def _attack_info(results: dict, name: str, systems: list[str]) -> dict:
  attack = results.get("attack", {})
  if name in attack:
    return attack[name]
  for system in systems:
    key = f"{name}@{results.get('systems', {}).get(system, {}).get('system', '')}"
    if key in attack:
      return attack[key]
  return {}


def legacy_condition(results: dict, name: str, row_keys=()) -> Condition:
  """A condition record from its name (``'clean'``, ``'no_visual'`` or
  ``'<attack>@<eps>'``, ``AttackSpec.name``'s grammar), the rows ``row_keys`` it produced
  and its ``results['attack']`` entry (threat, objective, items)."""
  rows = tuple(row_keys)
  if name == CLEAN:
    return Condition(name, "clean", rows=rows, family=name)
  if name == _FLOOR:
    return Condition(name, "floor", rows=rows, family=name)
  family, eps = parse_condition(name)
  if eps is None:  # A name outside the grammar (e.g. a targeted 'csema'): no budget.
    return Condition(name, "targeted", rows=rows, family=family)
  tokens = family.split("-")
  wb = "wb" in tokens
  parsed = [legacy_row(k) for k in rows]
  systems = [r.system for r in parsed if not r.gated]
  info = _attack_info(results, name, systems)
  objective = info.get("objective") or (
      tokens[1] if len(tokens) > 1 and tokens[1] != "wb" else "bpr")
  eot = next((int(t[3:]) for t in tokens if re.fullmatch(r"eot\d+", t)), None)
  compare_with = None
  if "2xsteps" in tokens:
    kind = "sanity"
    compare_with = condition_key("-".join(t for t in tokens if t != "2xsteps"), eps)
  elif wb and eps == 64:
    kind = "sanity"
  elif wb:
    kind = "whitebox"
  elif len(tokens) == 1:
    kind = "transfer"
  else:
    kind = "adaptive"
  return Condition(
      name, kind, attack=tokens[0], objective=objective, eps=eps,
      through=(systems[0] if wb and systems else None),
      threat=info.get("threat") or ("white-box" if wb else "transfer"),
      threat_model=info.get("threat_model", ""),
      items="subset" if "systems" in info else "all",
      gated=any(r.gated for r in parsed) or any(re.fullmatch(r"det[\d.e+-]+", t)
                                               for t in tokens),
      compare_with=compare_with, rows=rows, family=family, eot=eot)


def legacy_targeted_budgets(attack_keys) -> list[float]:
  """The eps of the targeted attack keys without an attacked system (``'pgd-insa@8'``, not
  ``'pgd-insa-wb@8@defended'`` or ``'csema'``), sorted."""
  return sorted({e for e in (parse_condition(k)[1] for k in attack_keys if k.count("@") == 1)
                 if e is not None})


# ---- Reading the records ---------------------------------------------------------------------

def _from_record(results: dict, rec: dict) -> Condition:
  eps = rec.get("eps")
  eps = None if eps is None else float(eps)
  name = rec["name"]
  family = rec.get("family")
  if family is None:  # For display and eps sweeps: the name less its own budget.
    suffix = f"@{eps:g}" if eps is not None else ""
    family = name[:-len(suffix)] if suffix and name.endswith(suffix) else name
  eot = rec.get("eot")
  if eot is None and rec.get("through"):  # EOT runs on the randomised systems only.
    info = results.get("systems", {}).get(rec["through"], {})
    draws = results.get("config", {}).get("attack", {}).get("adaptive", {}).get("eot_samples")
    eot = int(draws) if info.get("randomized") and draws and int(draws) > 1 else None
  return Condition(
      name, rec["kind"], attack=rec.get("attack"), objective=rec.get("objective"), eps=eps,
      through=rec.get("through"), threat=rec.get("threat") or "",
      threat_model=rec.get("threat_model") or "", items=rec.get("items") or "all",
      gated=bool(rec.get("gated")), compare_with=rec.get("compare_with"),
      rows=tuple(rec.get("rows") or ()), family=family, eot=eot)


class Records:
  """The row and condition records of one results dict (from its ``rows`` and
  ``conditions`` sections, else derived from its row names: ``legacy``)."""

  def __init__(self, results: dict):
    self.results = results
    recorded = results.get("rows")
    self.legacy = not isinstance(recorded, dict) or not isinstance(
        results.get("conditions"), list)
    self._rows: dict[str, Row] = {}
    if not self.legacy:
      for key, r in recorded.items():
        system = r["system"]
        self._rows[key] = Row(key, system, r["condition"], r.get("gate_of"),
                              baseline=bool(r.get("baseline", system == MOSTPOP)))
      self._conditions = [_from_record(results, c) for c in results["conditions"]]
    else:
      for key in self._row_keys():
        self._rows[key] = legacy_row(key)
      by_cond: dict[str, list[str]] = {}
      for key, r in self._rows.items():
        by_cond.setdefault(r.condition, []).append(key)
      for cond in results.get("detection", {}):
        by_cond.setdefault(cond, [])
      self._conditions = [legacy_condition(results, c, keys) for c, keys in by_cond.items()]

  def _row_keys(self) -> list[str]:
    keys = {}
    for section in ROW_SECTIONS:
      for key in self.results.get(section) or {}:
        keys.setdefault(key, None)
    for section in ("comparisons", "comparisons_full"):
      for key in self.results.get(section) or {}:
        for side in key.split(" - "):
          keys.setdefault(side, None)
    return list(keys)

  @property
  def rows(self) -> dict[str, Row]:
    """Every recorded row, by key, in table order."""
    return dict(self._rows)

  @property
  def conditions(self) -> list[Condition]:
    """Every condition record, in evaluation order (legacy: order of first appearance)."""
    return list(self._conditions)

  def row(self, key: str) -> Row:
    """The record of row ``key`` (derived from the key where none is recorded)."""
    found = self._rows.get(key)
    return found if found is not None else legacy_row(key)

  def condition(self, name: str, *, row: str | None = None) -> Condition:
    """The record of condition ``name``; where several share the name, the one that
    produced ``row`` (else that row's system attacked through, else the first)."""
    named = [c for c in self._conditions if c.name == name]
    if row is not None and len(named) > 1:
      r = self.row(row)
      named = ([c for c in named if row in c.rows]
               or [c for c in named if c.through in (r.system, r.gate_of)] or named)
    return named[0] if named else legacy_condition(self.results, name, [row] if row else [])

  def condition_of(self, key: str) -> Condition:
    """The condition record of row ``key``."""
    return self.condition(self.row(key).condition, row=key)

  def find(self, system: str, condition: str) -> str:
    """The key of ``system``'s row under ``condition``: the recorded one, else
    ``'<system>/<condition>'`` (:func:`jaxvars.conditions.row_key`)."""
    for key, r in self._rows.items():
      if r.system == system and r.condition == condition:
        return key
    return f"{system}/{condition}"

  def gate_of(self, system: str) -> str | None:
    """The ungated system of a gated row's ``system``, or None."""
    for r in self._rows.values():
      if r.system == system:
        return r.gate_of
    return legacy_row(f"{system}/{CLEAN}").gate_of if self.legacy else None

  def systems(self, section: str = "ranking", *, baselines: bool = False) -> list[str]:
    """The system names of ``results[section]``'s rows, in order: the evaluated systems
    (gated ones included), or with ``baselines`` only the most-popular baseline's."""
    seen = {}
    for key in self.results.get(section) or {}:
      r = self.row(key)
      if r.baseline == baselines:
        seen.setdefault(r.system, None)
    return list(seen)

  def floor(self, section: dict) -> dict | None:
    """The first row of ``section`` under the floor condition (no visual signal), or None."""
    return next((row for key, row in section.items()
                 if self.condition_of(key).kind == "floor"), None)

  def targeted_budgets(self) -> list[float]:
    """The eps of the targeted attacks transferred from the undefended recommender
    (``results['targeted']['attacks']``), sorted."""
    attacks = (self.results.get("targeted") or {}).get("attacks", {})
    targeted = [c for c in self._conditions if c.kind == "targeted"]
    if targeted:
      return sorted({c.eps for c in targeted if c.through is None and c.eps is not None
                     and c.name in attacks})
    return legacy_targeted_budgets(attacks)


def records(results: dict) -> Records:
  """The records of ``results`` (derived once per call: build one per table)."""
  return Records(results)


def is_paper_defence(system: str) -> bool:
  """A system of the paper's defence (OURS and its variants: the registry names
  ``defended*``), as against the other baselines (JPEG, bit depth)."""
  return system.startswith("defended")
