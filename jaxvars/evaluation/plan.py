"""The evaluation as a plan: one ordered list of :class:`Condition` s built from the config.

A condition is what the catalogue's photos went through before the systems rank it: clean,
an attack, or (``floor``) no photo at all. Each knows its threat model, the items it
perturbs, where its crafted photos are cached, its row names and which rows it is paired
with, so the loop (:mod:`jaxvars.evaluation.loop`) treats them all alike: craft, extract
features, score. The kinds, in plan order:

* ``clean``: the photos as uploaded; every system (and the most-popular baseline).
* ``transfer``: the paper's attacks (``config.attack.methods`` x ``eval_eps``), crafted on
  the undefended recommender and given to every system, on every item (paper 4.2).
* ``adaptive``: stronger untargeted objectives (``config.attack.adaptive.objectives``),
  transferred to every system, on the item subset (:func:`attack_items`).
* ``whitebox``: PGD through each defended system of ``config.attack.adaptive.systems``
  (EOT over a randomised transform, BPDA for quantisation), with detector-aware variants
  (``gated``: rows also for the system that rejects flagged uploads), on the subset.
* ``sanity``: Carlini et al. (2019): the first white-box attack with twice the steps
  (``compare_with`` names the attack it must not beat by much), and eps 64 with the
  strongest objective (it should reach the ``floor``).
* ``targeted``: item promotion (AIP's INSA / EXPA / c-SEMA, TAaMR) on the chosen targets
  (:mod:`jaxvars.evaluation.targeted`); scored by list metrics, not ranking rows.
* ``floor``: no visual signal (every item's visual feature zero), the undefended system.

Adding an attack condition: a function ``(config, ctx: PlanInputs) -> list[Condition]``
registered in :data:`PLANNERS` (the order of registration is the plan's order).
"""

from __future__ import annotations

import dataclasses

from jaxvars.attacks.spec import AttackSpec, attack_spec
from jaxvars.conditions import CLEAN, row_key
from jaxvars.defenses import SYSTEMS, UNDEFENDED
from jaxvars.registry import Registry

KINDS = ("clean", "transfer", "adaptive", "whitebox", "sanity", "targeted", "floor")
FLOOR = "no_visual"
MOSTPOP = "mostpop"
GATE_SUFFIX = "+gate"  # Row name of a system that rejects flagged uploads (gated conditions).


@dataclasses.dataclass(frozen=True)
class Condition:
  """One evaluation condition.

  Attributes:
    name: the condition part of its row keys, e.g. ``'pgd@8'``, ``'pgd-wb-eot4@8'``,
      ``'clean'`` (targeted: the attack's key in ``results['targeted']['attacks']``).
    kind: one of :data:`KINDS`.
    systems: registered system names ranked (or scored) under it.
    spec: the attack (None: clean, floor, c-SEMA).
    subset: it perturbs only the item subset (:func:`attack_items`; targeted: the targets);
      its ranking rows are scored on the users whose held-out item it attacked.
    gated: detector-aware: a '+gate' row per system too (flagged uploads rejected).
    compare_with: the condition a sanity check is paired with (same attack, fewer steps).
  """
  name: str
  kind: str
  systems: tuple[str, ...]
  spec: AttackSpec | None = None
  subset: bool = False
  gated: bool = False
  compare_with: str | None = None

  @property
  def attacked(self) -> bool:
    return self.kind not in ("clean", "floor")

  @property
  def cache_key(self) -> str | None:
    """The attack cache's file stem: the condition, plus the attacked system for a
    white-box attack (None: nothing is crafted and cached)."""
    if self.spec is None or self.kind == "targeted":
      return None
    return self.spec.condition + (f"@{self.spec.through}" if self.spec.through else "")

  @property
  def threat(self) -> str:
    if self.kind == "floor":
      return "none (no visual signal)"
    if self.spec is None:
      return "none" if self.kind == "clean" else "semantic (no budget): the hook's photo pasted in"
    return self.spec.threat_short

  def row_systems(self, names: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """(row system name, registered system, gate_of) of each ranking row, in table order:
    ``names`` maps a registered system to its row name."""
    out = [(names[s], s, None) for s in self.systems]
    if self.gated:
      out += [(names[s] + GATE_SUFFIX, s, names[s]) for s in self.systems]
    return out

  def record(self, rows: list[str]) -> dict:
    """The condition's entry in results.json's ``conditions``."""
    s = self.spec
    return {"name": self.name, "kind": self.kind,
            "family": s.name if s is not None else None,
            "attack": s.method if s is not None else None,
            "objective": s.objective if s is not None else None,
            "eps": float(s.eps) if s is not None else None,
            "through": s.through if s is not None else None,  # A registered system.
            "eot": int(s.eot) if s is not None else None,
            "threat": self.threat,
            "threat_model": s.threat_model if s is not None else self.threat,
            "items": "subset" if self.subset else "all", "gated": self.gated,
            "compare_with": self.compare_with, "cache_key": self.cache_key,
            "systems": list(self.systems), "rows": list(rows)}


@dataclasses.dataclass(frozen=True)
class PlanInputs:
  """What the plan depends on beyond the config.

  Attributes:
    systems: the evaluated systems (registered names), in table order.
    transfer: the transfer attacks' specs (the ablations pass their own eps and methods).
    detector: a trained detector is evaluated (detector-aware attacks, gated rows).
    uses_features: the recommender uses item photos (else no attack can move it).
    has_logits: the backbone has a classifier head (TAaMR).
    has_floor: the recommender scores items without their photos too, so a no-visual level
      exists (False for DVBPR, whose score is the photo's embedding alone).
  """
  systems: tuple[str, ...]
  transfer: tuple[AttackSpec, ...]
  detector: bool = True
  uses_features: bool = True
  has_logits: bool = True
  has_floor: bool = True


PLANNERS = Registry("evaluation condition planner")


@PLANNERS.register("clean")
def _clean(config, p: PlanInputs) -> list[Condition]:
  return [Condition(CLEAN, "clean", p.systems)]


@PLANNERS.register("transfer")
def _transfer(config, p: PlanInputs) -> list[Condition]:
  return [Condition(s.condition, "transfer", p.systems, spec=s) for s in p.transfer]


@PLANNERS.register("adaptive")
def _adaptive(config, p: PlanInputs) -> list[Condition]:
  """Stronger objectives transferred, white-box attacks and the sanity checks, per eps of
  ``config.attack.adaptive`` (the order of :mod:`jaxvars.evaluation.adaptive`'s table)."""
  ad = config.attack.get("adaptive")
  if ad is None:
    return []
  out = []
  for eps in ad.eps:
    for objective in ad.objectives:
      for method in ad.methods:
        spec = attack_spec(config.attack, method, eps, objective=objective)
        out.append(Condition(spec.condition, "adaptive", p.systems, spec=spec, subset=True))
    targets = [s for s in ad.systems if s in p.systems and s != UNDEFENDED]
    bases = {}
    for target in targets:
      eot = int(ad.eot_samples) if SYSTEMS.get(target).randomized else 1
      for method in ad.methods:
        base = attack_spec(config.attack, method, eps, objective="bpr", through=target,
                           eot=eot, restarts=int(ad.restarts))
        bases.setdefault(target, base)
        out.append(Condition(base.condition, "whitebox", (target,), spec=base, subset=True))
        if p.detector:
          out += [Condition(s.condition, "whitebox", (target,), spec=s, subset=True, gated=True)
                  for s in (dataclasses.replace(base, detector_lambda=float(lam))
                            for lam in ad.detector_lambdas if lam > 0)]
    if ad.sanity and targets:
      first = targets[0]
      base = attack_spec(config.attack, "pgd", eps, objective="bpr", through=first,
                         eot=bases[first].eot if first in bases else 1,
                         restarts=int(ad.restarts))
      longer = dataclasses.replace(base, steps=2 * base.steps, tag="2xsteps")
      compare = base.condition if first in bases and bases[first].method == "pgd" else None
      out.append(Condition(longer.condition, "sanity", (first,), spec=longer, subset=True,
                           compare_with=compare))
      if eps < 64:  # The strongest untargeted objective, to reach the no-visual level.
        spec = attack_spec(config.attack, "pgd", 64.0,
                           objective=ad.get("sanity_objective", "demote"), through=first)
        out.append(Condition(spec.condition, "sanity", (first,), spec=spec, subset=True))
  return out


@PLANNERS.register("targeted")
def _targeted(config, p: PlanInputs) -> list[Condition]:
  """AIP's and TAaMR's item promotion (:mod:`jaxvars.evaluation.targeted`): perturbation
  attacks transferred to every system, c-SEMA, and white-box INSA through defended systems."""
  t = config.get("targeted")
  if not t or not t.num_targets or UNDEFENDED not in p.systems or not p.uses_features:
    return []
  out = []
  for eps in t.eps:
    for objective in t.objectives:
      if objective == "taamr" and not p.has_logits:
        continue
      for method in t.methods:
        spec = attack_spec(config.attack, method, eps, objective=objective)
        out.append(Condition(spec.condition, "targeted", p.systems, spec=spec, subset=True))
  if t.csema:
    out.append(Condition("csema", "targeted", p.systems, subset=True))
  for system in t.whitebox_systems:
    if system not in p.systems:
      continue  # Not evaluated (config.systems.evaluate): logged by the loop.
    spec = attack_spec(config.attack, "pgd", t.eps[0], objective=t.whitebox_objective,
                       through=system, eot=int(config.attack.adaptive.eot_samples)
                       if SYSTEMS.get(system).randomized else 1)
    out.append(Condition(f"{spec.condition}@{system}", "targeted", (system,), spec=spec,
                         subset=True))
  return out


@PLANNERS.register("floor")
def _floor(config, p: PlanInputs) -> list[Condition]:
  if UNDEFENDED in p.systems and p.uses_features and p.has_floor:
    return [Condition(FLOOR, "floor", (UNDEFENDED,))]
  return []


def make_plan(config, inputs: PlanInputs) -> list[Condition]:
  """Every condition of the evaluation, in order (clean, transfer, adaptive / white-box /
  sanity, targeted, floor): the planners of :data:`PLANNERS` in registration order, each
  condition once (an unbounded C&W, ``'cw@255'``, comes out of every eps of a planner's
  loop the same)."""
  plan = []
  for name in PLANNERS.names():
    plan += PLANNERS.get(name)(config, inputs)
  return list(dict.fromkeys(plan))


def row_order(plan: list[Condition], names: dict[str, str], mostpop: bool) -> list[str]:
  """Ranking row keys in table order: grouped by system (most-popular first, each system
  followed by its gated rows), conditions in plan order."""
  conds = list(dict.fromkeys(c.name for c in plan if c.kind != "targeted"))
  systems = [MOSTPOP] * mostpop + [n for s in names.values() for n in (s, s + GATE_SUFFIX)]
  return [row_key(s, c) for s in systems for c in conds]
