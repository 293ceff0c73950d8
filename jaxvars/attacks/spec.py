"""What an attack is, built from ``config.attack`` in one place: method, objective, budget,
the PGD step rule and C&W's settings.

An :class:`AttackSpec` names one attack of the evaluation (its ``name`` heads the result
rows and the cache files: ``'pgd'`` for PGD on the paper's objective, ``'pgd-feature'`` for
PGD on another objective) and runs it on a batch (:meth:`AttackSpec.run`). Methods are
registered in ``METHODS`` (``fgsm``, ``pgd``, ``cw``), objectives in
:data:`jaxvars.attacks.objectives.OBJECTIVES`.

C&W (:mod:`jaxvars.attacks.cw`) minimises the L2 norm instead of spending a budget: its
``eps`` is an L-inf *cap* on it, :data:`jaxvars.conditions.UNBOUNDED` (255: the whole [0, 1]
box, no cap) unless ``config.attack.cw.bounded``, so its condition is ``'cw@255'`` (C&W as
Carlini & Wagner and Anelli et al. report it), or ``'cw@8'`` at each ``eval_eps`` when
bounded (:func:`attack_spec`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvars.attacks.cw import cw_l2
from jaxvars.attacks.linf import fgsm, pgd
from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, cw_value
from jaxvars.conditions import UNBOUNDED, condition_key
from jaxvars.registry import Registry

METHODS = Registry("attack method")
METHODS.register("fgsm", "Fast Gradient Sign Method, one step of eps (Goodfellow et al. 2015)")
METHODS.register("pgd", "Projected Gradient Descent, L-inf (Madry et al. 2018)")
# Registered after pgd: an attacked catalogue's random stream is seeded with the method's index.
METHODS.register("cw", "Carlini & Wagner's L2 attack with its binary search over c (2017)")
DEFAULT_OBJECTIVE = "bpr"


def step_size(eps, *, ratio: float, fixed: float):
  """PGD's step (1/255 units) at budget ``eps``: ``ratio * eps`` when ``ratio > 0``, else
  ``fixed``. ``eps`` may be a traced value (the defence step draws it per step)."""
  return ratio * eps if ratio > 0 else fixed


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack (static, hashable).

  Attributes:
    method: 'fgsm' | 'pgd' | 'cw'. objective: a registered objective ('bpr' = paper eq. 3).
    eps: budget, 1/255 units (C&W: its L-inf cap, 255 = none; :func:`attack_spec` sets 255
      unless ``config.attack.cw.bounded``, a spec built by hand keeps the 8 it defaults to).
      steps: PGD iterations; C&W's Adam steps per binary-search run. alpha_ratio, alpha: PGD's step rule
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
    binary_search_steps, initial_c, lr, kappa: C&W's (:func:`jaxvars.attacks.cw.cw_l2`);
      kappa in the units of the objective's margin (its loss without one).
    loss_margin: C&W on an objective without a margin of its own: a photo is adversarial
      where its loss exceeds the clean photo's by more than this (the objective's units).
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
  binary_search_steps: int = 9
  initial_c: float = 1e-3
  lr: float = 1e-2
  kappa: float = 0.0
  loss_margin: float = 1.0

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

  @property
  def gradient_batches(self) -> int:
    """Forward-and-backward passes per batch of photos and restart: FGSM 1, PGD
    ``steps + 1``, C&W ``binary_search_steps * steps`` (what the planner counts)."""
    if self.method == "fgsm":
      return 1
    if self.method == "cw":
      return int(self.binary_search_steps) * int(self.steps)
    return int(self.steps) + 1

  @property
  def cw_settings(self) -> dict:
    """C&W's settings (part of an attacked catalogue's fingerprint), {} for FGSM and PGD."""
    if self.method != "cw":
      return {}
    return {"binary_search_steps": int(self.binary_search_steps),
            "initial_c": float(self.initial_c), "lr": float(self.lr),
            "kappa": float(self.kappa), "loss_margin": float(self.loss_margin)}

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
    value = cw_value(objective) if self.method == "cw" else objective.loss
    return self.run_loss(lambda x: value(ctx, x), images, key, eps=eps)

  def run_loss(self, loss_fn, images: jax.Array, key: jax.Array | None, *, eps=None,
               stochastic: bool = False, return_curve: bool = False,
               return_success: bool = False):
    """The attack on any ``loss_fn`` (per-photo losses [B] to maximise; with
    ``stochastic``, ``loss_fn(images, key)``), with this spec's method, budget, steps and
    restarts (each photo keeps the restart with its highest final loss).

    For C&W ``loss_fn`` is what :func:`jaxvars.attacks.objectives.cw_value` gives: minus the
    objective's margin where it has one (a photo is adversarial where it exceeds
    ``kappa``), else its loss, which is then made relative to the clean photo's,
    ``loss(x') - loss(x) - loss_margin`` (the clean loss evaluated once, with the final
    check's key where stochastic). Restarts and random starts do not apply to it.

    Returns:
      float32 [B, H, W, 3] (and the first restart's loss curve [steps + 1] with
      ``return_curve``; FGSM's and C&W's are [2]: the mean ``loss_fn`` before and after;
      then with ``return_success``, C&W's bool [B], the photos it made adversarial,
      re-checked on the returned 8-bit photos, and None for FGSM and PGD).
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
      return _outputs(adv, curve, None, return_curve, return_success)
    if self.method == "cw":
      return self._run_cw(loss_fn, images, loss_key if stochastic else None, eps=eps,
                          return_curve=return_curve, return_success=return_success)
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
    return _outputs(best, curve, None, return_curve, return_success)

  def _run_cw(self, loss_fn, images, loss_key, *, eps, return_curve, return_success):
    """C&W on ``loss_fn`` (:meth:`run_loss`); ``loss_key``: the key of a stochastic one."""
    last = int(self.binary_search_steps) * int(self.steps)  # cw_l2's key of its final check.
    at = (lambda x, t: loss_fn(x)) if loss_key is None else (
        lambda x, t: loss_fn(x, jax.random.fold_in(loss_key, t)))
    start = jax.lax.stop_gradient(at(images, last))
    value = loss_fn
    if OBJECTIVES.get(self.objective).margin is None:  # Success: the loss rose by loss_margin.
      value = (lambda x: loss_fn(x) - start - self.loss_margin) if loss_key is None else (
          lambda x, k: loss_fn(x, k) - start - self.loss_margin)
    adv, trace = cw_l2(value, images, steps=int(self.steps),
                       binary_search_steps=int(self.binary_search_steps),
                       initial_c=float(self.initial_c), lr=float(self.lr),
                       kappa=float(self.kappa), eps=eps, loss_key=loss_key, return_trace=True)
    curve = jnp.stack([jnp.mean(start), jnp.mean(at(adv, last))])
    return _outputs(adv, curve, trace["success"], return_curve, return_success)


def _outputs(adv, curve, success, return_curve: bool, return_success: bool):
  out = (adv,) + ((curve,) if return_curve else ()) + ((success,) if return_success else ())
  return out if len(out) > 1 else adv


def attack_spec(attack_config, method: str, eps: float, *, objective: str | None = None,
                **overrides) -> AttackSpec:
  """The spec of ``method`` at ``eps`` with the settings of ``config.attack`` (C&W: those of
  ``config.attack.cw``, AttackSpec's defaults where a config has no such section; its eps
  is :data:`~jaxvars.conditions.UNBOUNDED` unless ``config.attack.cw.bounded``)."""
  a = attack_config
  fields = dict(method=method, objective=objective or a.get("objective", DEFAULT_OBJECTIVE),
                eps=float(eps), steps=int(a.pgd_steps),
                alpha_ratio=float(a.get("pgd_alpha_ratio", 0.0) or 0.0),
                alpha=float(a.pgd_alpha), random_start=bool(a.random_start),
                triplets_per_item=int(a.triplets_per_item), seed=int(a.seed))
  if method == "cw":
    fields.update(cw_fields(a.get("cw")), eps=float(eps) if cw_bounded(a) else UNBOUNDED)
  fields.update(overrides)
  return AttackSpec(**fields)


# config.attack.cw's fields that are AttackSpec fields (``steps``: AttackSpec.steps).
CW_FIELDS = ("steps", "binary_search_steps", "initial_c", "lr", "kappa", "loss_margin")


def cw_bounded(attack_config) -> bool:
  """Whether C&W runs at every eps of ``eval_eps`` as an L-inf cap (``config.attack.cw.bounded``;
  False: once, unbounded, condition ``'cw@255'``)."""
  cw = attack_config.get("cw")
  return bool(cw is not None and cw.get("bounded", False))


def cw_fields(cw_config) -> dict:
  """AttackSpec fields from ``config.attack.cw`` (None: AttackSpec's defaults, with
  ``steps`` :data:`CW_DEFAULT_STEPS`)."""
  if cw_config is None:
    return {"steps": CW_DEFAULT_STEPS}
  types = {"steps": int, "binary_search_steps": int}
  return {k: types.get(k, float)(cw_config[k]) for k in CW_FIELDS if k in cw_config}


CW_DEFAULT_STEPS = 1000  # configs/joint.py's default (the reference's 10000 with early abort).
