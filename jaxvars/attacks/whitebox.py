"""The loss of an attack that knows the defence (white-box, adaptive; Athalye et al. 2018,
Tramer et al. 2020): the objective computed through the defended system's own pipeline.

* The uploaded photo is 8-bit: the attacker's iterate is quantised before the defence
  sees it, with an identity backward pass (BPDA). Non-differentiable steps of a defence
  (JPEG, bit depth) already pass the identity backward.
* A randomised system (random resize + pad) is attacked with EOT: the objective is
  averaged over ``spec.eot`` draws of its transform, fresh draws at every step.
* Detector-aware: ``objective - lambda * relu(score(x) - threshold)`` keeps the photo
  below the deployed detector's threshold (the deployed threshold is public to a
  white-box attacker).

* The objective's item table (``ctx.table``: eq. 3's other item of each triplet, the
  feature objective's reference, EXPA's hook) is the clean table f(x) by default, or, with
  ``config.attack.whitebox_table='deployed'``, the attacked system's own deployed table
  (``table``: f(D(x)) of every item for OURS, the K draws of f(rand(D(x))) for OURS-rand),
  the features the system ranks the unattacked items with.

Without ``spec.through`` this is the transfer attack's loss (the undefended pipeline).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvars.attacks.linf import quantize_8bit
from jaxvars.attacks.objectives import OBJECTIVES, cw_value
from jaxvars.defenses.systems import SYSTEMS, draw_keys

# config.attack.whitebox_table: what a white-box attack's objective reads as the item table.
WHITEBOX_TABLES = ("clean", "deployed")


def uses_deployed_table(spec, config) -> bool:
  """Whether ``spec`` is crafted with the attacked system's deployed table as its objective's
  item table: a white-box attack (``spec.through``) under
  ``config.attack.whitebox_table='deployed'``."""
  return (spec.through is not None and config is not None
          and config.attack.get("whitebox_table", "clean") == "deployed")


def attack_loss(spec, *, models, params, consts, config, items, inputs=None, constants=None,
                num_users: int = 0, threshold: float | None = None, table=None):
  """The per-photo loss to maximise, and whether it is stochastic.

  Args:
    spec: the :class:`jaxvars.attacks.spec.AttackSpec`.
    models, params, consts: the composed models, their parameters and constants.
    config: the run's config (the defended system's settings).
    items: int32 [B] the batch's items. inputs: the objective's batch inputs (triplets).
    constants: the objective's per-catalogue constants. num_users: U.
    threshold: the deployed detector threshold (detector-aware attacks).
    table: the objective's item table (``ctx.table``): float32 [I, F], or [K, I, F] for a
      randomised system's K deployed draws (EOT draw d of the attacked photos then reads
      draw d mod K); None = ``consts['features']``, the clean table f(x).

  Returns:
    (loss_fn, stochastic): ``loss_fn(images[, key]) -> float32 [B]``; for C&W the
    objective's :func:`~jaxvars.attacks.objectives.cw_value` (minus its margin) instead of
    its loss, through the same pipeline, EOT and detector penalty.

  Raises:
    ValueError: a detector-aware spec without a threshold.
  """
  objective = OBJECTIVES.get(spec.objective)
  value_of = cw_value(objective) if spec.method == "cw" else objective.loss
  ctx = models.attack_context(params["recommender"], consts, items, inputs)
  ctx = dataclasses.replace(ctx, constants=constants, num_users=num_users)
  tables = None
  if table is not None:
    tables = jnp.asarray(table)
    tables = tables[None] if tables.ndim == 2 else tables  # [K, I, F]
    ctx = dataclasses.replace(ctx, table=tables[0])
  if spec.through is None and spec.detector_lambda <= 0:
    return (lambda x: value_of(ctx, x)), False
  if spec.detector_lambda > 0 and threshold is None:
    raise ValueError(f"{spec.name}: a detector-aware attack needs the deployed threshold")
  system = SYSTEMS.get(spec.through) if spec.through else None
  transform = system.make(config) if system else None
  stochastic = bool(system and system.randomized)

  def loss(x, key=None):
    xq = x + jax.lax.stop_gradient(quantize_8bit(x) - x)  # BPDA for the 8-bit upload.
    if system is None:
      seen = xq[None]
    elif system.randomized:
      seen = transform(models, params, xq, draw_keys(items, key, draws=max(1, spec.eot)),
                       consts)
    else:
      seen = transform(models, params, xq, None, consts)[None]
    k, b = seen.shape[:2]
    out = models.backbone_out(consts, seen.reshape((k * b,) + seen.shape[2:]))
    feats = models.features_from(consts, out, seen.reshape((k * b,) + seen.shape[2:])
                                 ).reshape(k, b, -1)
    logits = out["logits"].reshape(k, b, -1) if "logits" in out else None
    total = 0.0
    for d in range(k):
      view = dataclasses.replace(
          ctx, features=lambda _, f=feats[d]: f,
          logits=(lambda _, z=logits[d]: z) if logits is not None else None,
          **({"table": tables[d % tables.shape[0]]} if tables is not None else {}))
      total = total + value_of(view, xq)
    value = total / k
    if spec.detector_lambda > 0:
      excess = models.detection_scores(params, consts, xq) - threshold
      value = value - spec.detector_lambda * jax.nn.relu(excess)
    return value

  if not stochastic:
    return (lambda x: loss(x)), False
  return loss, True
