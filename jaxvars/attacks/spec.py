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
import jax.numpy as jnp

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
    through: None (crafted on the undefended recommender and transferred: the paper's
      threat model) or a registered defended system the attacker differentiates through
      (white-box, adaptive; :mod:`jaxvars.attacks.whitebox`).
    eot: draws of a randomised system's transform averaged per step (EOT).
    restarts: PGD runs from different random starts; each photo keeps its best.
    detector_lambda: > 0: detector-aware, the objective minus lambda * relu(score -
      threshold) (stay below the deployed detector's threshold).
    tag: appended to the name, for variants the other fields do not name (e.g. '2xsteps').
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
  through: str | None = None
  eot: int = 1
  restarts: int = 1
  detector_lambda: float = 0.0
  tag: str = ""

  @property
  def name(self) -> str:
    """'fgsm' / 'pgd' on the paper's objective, else '<method>-<objective>'; white-box
    attacks add '-wb' (and '-eot<K>', '-det<lambda>', '-r<restarts>', '-s<steps>' where they
    apply), e.g. 'pgd-wb-eot4-det1'."""
    parts = [self.method] + ([self.objective] if self.objective != DEFAULT_OBJECTIVE else [])
    if self.through is not None:
      parts.append("wb")
      parts += [f"eot{self.eot}"] if self.eot > 1 else []
    parts += [f"det{self.detector_lambda:g}"] if self.detector_lambda > 0 else []
    parts += [f"r{self.restarts}"] if self.restarts > 1 else []
    parts += [self.tag] if self.tag else []
    return "-".join(parts)

  @property
  def threat_short(self) -> str:
    """A few words for a table column ('transfer', 'white-box: defended, EOT 4', ...)."""
    if self.through is None:
      return "transfer"
    words = f"white-box: {self.through}" + (f", EOT {self.eot}" if self.eot > 1 else "")
    return words + (", detector-aware" if self.detector_lambda > 0 else "")

  @property
  def threat_model(self) -> str:
    """One line for the report."""
    if self.through is None:
      return ("transfer (black-box to the defence): crafted on the undefended recommender "
              "with full knowledge of it, then given to every system")
    what = f"white-box adaptive through {self.through}"
    what += f", EOT over {self.eot} draws of its random transform" if self.eot > 1 else ""
    what += ", BPDA (identity backward) for 8-bit quantisation and non-differentiable steps"
    if self.detector_lambda > 0:
      what += f", detector-aware (penalty {self.detector_lambda:g} x excess over the threshold)"
    return what

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
    return self.run_loss(lambda x: objective.loss(ctx, x), images, key, eps=eps)

  def run_loss(self, loss_fn, images: jax.Array, key: jax.Array | None, *, eps=None,
               stochastic: bool = False, return_curve: bool = False):
    """The attack on any ``loss_fn`` (per-photo losses [B] to maximise; with
    ``stochastic``, ``loss_fn(images, key)``), with this spec's method, budget, steps and
    restarts (each photo keeps the restart with its highest final loss).

    Returns:
      float32 [B, H, W, 3] (and the first restart's loss curve [steps + 1] with
      ``return_curve``; FGSM's is [2]: before and after).
    """
    objective = OBJECTIVES.get(self.objective)
    eps = self.eps if eps is None else eps
    # The random start (and R+FGSM's step) use ``key`` itself; the EOT draws of a stochastic
    # loss, and the restarts, keys folded from it.
    loss_key = jax.random.fold_in(key, 2**20) if key is not None else None
    evaluate = (lambda x: loss_fn(x, loss_key)) if stochastic else loss_fn
    if self.method == "fgsm":
      adv = fgsm(evaluate, images, eps=eps,
                 key=key if objective.random_first_step else None)
      curve = jnp.stack([jnp.mean(evaluate(images)), jnp.mean(evaluate(adv))])
      return (adv, curve) if return_curve else adv
    if self.method != "pgd":
      METHODS.check(self.method, "attack method")
    best, best_loss, curve = None, None, None
    for r in range(max(1, self.restarts)):
      start = key if r == 0 or key is None else jax.random.fold_in(key, r)
      adv, c = pgd(loss_fn, images, eps=eps, alpha=self.step(eps), steps=self.steps, key=start,
                   random_start=self.random_start, loss_key=loss_key if stochastic else None,
                   return_curve=True)
      if best is None:
        best, curve = adv, c
        if self.restarts > 1:
          best_loss = evaluate(best)
        continue
      loss = evaluate(adv)
      better = (loss > best_loss).reshape((-1,) + (1,) * (images.ndim - 1))
      best, best_loss = jnp.where(better, adv, best), jnp.maximum(loss, best_loss)
    return (best, curve) if return_curve else best


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
