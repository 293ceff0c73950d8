"""What an attack is, built from ``config.attack`` in one place: method, objective, budget,
and the PGD step rule.

An :class:`AttackSpec` names one attack of the evaluation (its ``name`` heads the result
rows and the cache files: ``'pgd'`` for PGD on the paper's objective, ``'pgd-feature'`` for
PGD on another objective) and runs it on a batch (:meth:`AttackSpec.run`). Methods are
registered in ``METHODS`` (``fgsm``, ``pgd``), objectives in
:data:`jaxvars.attacks.objectives.OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxvars.attacks.linf import fgsm, pgd
from jaxvars.attacks.objectives import OBJECTIVES, AttackContext
from jaxvars.conditions import condition_key
from jaxvars.registry import Registry

METHODS = Registry("attack method")
METHODS.register("fgsm", "Fast Gradient Sign Method, one step of eps (Goodfellow et al. 2015)")
METHODS.register("pgd", "Projected Gradient Descent, L-inf (Madry et al. 2018)")
DEFAULT_OBJECTIVE = "bpr"


def step_size(eps, *, ratio: float, fixed: float):
  """PGD's step (1/255 units) at budget ``eps``: ``ratio * eps`` when ``ratio > 0``, else
  ``fixed``. ``eps`` may be a traced value (the defence step draws it per step)."""
  return ratio * eps if ratio > 0 else fixed


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One L-inf attack (static, hashable).

  Attributes:
    method: 'fgsm' | 'pgd'. objective: a registered objective ('bpr' = paper eq. 3).
    eps: budget, 1/255 units. steps: PGD iterations. alpha_ratio, alpha: PGD's step rule
      (:func:`step_size`). random_start: PGD starts uniformly in the eps-ball.
    triplets_per_item: BPR triplets per item and role (objectives that need them).
    seed: seed of triplets and random starts (the same attack for every system).
  """
  method: str
  objective: str = DEFAULT_OBJECTIVE
  eps: float = 8.0
  steps: int = 10
  alpha_ratio: float = 0.25
  alpha: float = 2.0
  random_start: bool = True
  triplets_per_item: int = 8
  seed: int = 1

  @property
  def name(self) -> str:
    """'fgsm' / 'pgd' on the paper's objective, else '<method>-<objective>'."""
    return self.method if self.objective == DEFAULT_OBJECTIVE else f"{self.method}-{self.objective}"

  @property
  def condition(self) -> str:
    """The evaluation condition, e.g. 'pgd@8'."""
    return condition_key(self.name, self.eps)

  @property
  def needs_triplets(self) -> bool:
    return OBJECTIVES.get(self.objective).needs_triplets

  def step(self, eps=None):
    """PGD's step size at ``eps`` (default: this spec's)."""
    return step_size(self.eps if eps is None else eps, ratio=self.alpha_ratio, fixed=self.alpha)

  def run(self, ctx: AttackContext, images: jax.Array, key: jax.Array | None, *, eps=None):
    """The attacked images: float32 [B, H, W, 3], 8-bit quantised, in the eps-ball.

    Args:
      ctx: the objective's context. images: float32 [B, H, W, 3] in [0, 1].
      key: PRNG key (PGD's random start; R+FGSM where the objective needs it).
      eps: a budget overriding ``self.eps`` (may be traced); the step follows it.
    """
    objective = OBJECTIVES.get(self.objective)
    loss_fn = lambda x: objective.loss(ctx, x)
    eps = self.eps if eps is None else eps
    if self.method == "fgsm":
      return fgsm(loss_fn, images, eps=eps, key=key if objective.random_first_step else None)
    if self.method == "pgd":
      return pgd(loss_fn, images, eps=eps, alpha=self.step(eps), steps=self.steps, key=key,
                 random_start=self.random_start)
    METHODS.check(self.method, "attack method")
    raise AssertionError(self.method)


def attack_spec(attack_config, method: str, eps: float, *, objective: str | None = None,
                **overrides) -> AttackSpec:
  """The spec of ``method`` at ``eps`` with the settings of ``config.attack``."""
  a = attack_config
  fields = dict(method=method, objective=objective or a.get("objective", DEFAULT_OBJECTIVE),
                eps=float(eps), steps=int(a.pgd_steps),
                alpha_ratio=float(a.get("pgd_alpha_ratio", 0.0) or 0.0),
                alpha=float(a.pgd_alpha), random_start=bool(a.random_start),
                triplets_per_item=int(a.triplets_per_item), seed=int(a.seed))
  fields.update(overrides)
  return AttackSpec(**fields)
