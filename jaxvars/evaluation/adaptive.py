"""The attacks beyond the paper's transfer setting (issue: robustness under adaptive attacks),
run on an item subset and evaluated by splicing into the clean catalogue's features.

* Extra untargeted objectives (``config.attack.adaptive.objectives``: 'bpr_all',
  'feature', 'demote'), crafted on the undefended recommender and transferred to every
  system.
* White-box attacks through each defended system of ``config.attack.adaptive.systems``
  (EOT over random transforms, BPDA for quantisation), detector-aware variants
  (``detector_lambdas``) with the gated ranking (flagged uploads rejected: the item keeps
  its clean photo) and the attacked photos' pass rate, and Carlini et al.'s sanity checks
  (twice the steps; eps 64).

Each attack perturbs only the items of :func:`attack_items` (``config.eval.max_items``: the
users' held-out items first, then random others); the other items keep their clean photos
and their clean features, which are reused, not recomputed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.attacks.spec import attack_spec
from jaxvars.defenses import SYSTEMS, UNDEFENDED


@dataclasses.dataclass(frozen=True)
class ExtraAttack:
  """An attack run on the item subset: its spec, the systems ranked under it (their row
  names' system names), and whether the detector gates it."""
  spec: object
  systems: tuple[str, ...]
  gated: bool = False

  @property
  def key(self) -> str:
    """The attack table's key: the condition, and the attacked system for a white-box one."""
    return self.spec.condition + (f"@{self.spec.through}" if self.spec.through else "")


def attack_items(data, max_items: int, seed: int) -> np.ndarray | None:
  """The items the subset attacks perturb: every user's held-out item first (they decide
  HR@N), then random other items, ``max_items`` in all; None for every item (0)."""
  if not max_items or max_items >= data.num_items:
    return None
  rng = np.random.default_rng([seed, 13])
  tests = np.unique(data.test_items)
  if len(tests) >= max_items:
    return np.sort(rng.choice(tests, max_items, replace=False)).astype(np.int32)
  others = np.setdiff1d(np.arange(data.num_items), tests)
  extra = rng.choice(others, max_items - len(tests), replace=False)
  return np.sort(np.concatenate([tests, extra])).astype(np.int32)


def attacked_users(test_items: np.ndarray, items: np.ndarray | None) -> np.ndarray | None:
  """Boolean mask [U] of the users whose held-out item ``test_items[u]`` is among the
  attacked ``items`` (int [n]), or None where every user's is (``items`` None or a superset
  of the held-out items)."""
  if items is None:
    return None
  mask = np.isin(np.asarray(test_items), items)
  return None if mask.all() else mask


def extra_attacks(config, systems, *, detector: bool) -> list[ExtraAttack]:
  """The extra attacks of ``config.attack.adaptive`` for the evaluated ``systems``."""
  ad = config.attack.get("adaptive")
  if ad is None:
    return []
  out = []
  for eps in ad.eps:
    for objective in ad.objectives:
      for method in ad.methods:
        out.append(ExtraAttack(attack_spec(config.attack, method, eps, objective=objective),
                               tuple(systems)))
    targets = [s for s in ad.systems if s in systems and s != UNDEFENDED]
    for target in targets:
      eot = int(ad.eot_samples) if SYSTEMS.get(target).randomized else 1
      for method in ad.methods:
        base = attack_spec(config.attack, method, eps, objective="bpr", through=target,
                           eot=eot, restarts=int(ad.restarts))
        out.append(ExtraAttack(base, (target,)))
        if detector:
          out += [ExtraAttack(dataclasses.replace(base, detector_lambda=float(lam)), (target,),
                              gated=True) for lam in ad.detector_lambdas if lam > 0]
    if ad.sanity and targets:
      base = attack_spec(config.attack, "pgd", eps, objective="bpr", through=targets[0])
      out.append(ExtraAttack(dataclasses.replace(base, steps=2 * base.steps, tag="2xsteps"),
                             (targets[0],)))
      if eps < 64:  # The strongest untargeted objective, to reach the no-visual level.
        out.append(ExtraAttack(attack_spec(config.attack, "pgd", 64.0,
                                           objective=ad.get("sanity_objective", "demote"),
                                           through=targets[0]), (targets[0],)))
  return out


def craft(extra: ExtraAttack, *, items, threshold, cache_dir, **kwargs):
  """The attacked catalogue of one extra attack (cached like the transfer ones)."""
  return cached_attack_catalogue(extra.spec, cache_dir=cache_dir, items=items,
                                 threshold=threshold if extra.spec.detector_lambda > 0 else None,
                                 **kwargs)


def splice(clean: np.ndarray, items: np.ndarray | None, attacked: np.ndarray) -> np.ndarray:
  """Features of a catalogue in which only ``items`` changed: the clean features [I, F] (or
  [K, I, F]) with the attacked items' rows replaced."""
  if items is None:
    return attacked
  out = np.array(clean)
  out[..., items, :] = attacked
  return out
