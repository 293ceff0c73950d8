"""Attack objectives (things an attacker *maximises*), chosen by ``config.attack.objective``.

An objective is ``loss(ctx, images) -> float32 [B]`` (one loss per item photo), where
``ctx`` is an :class:`AttackContext`: how the attacked pipeline turns photos into item
features, the recommender's scores, and the batch's items (and BPR triplets when the
objective needs them). One file per objective, each registering an :class:`Objective` in
``OBJECTIVES``; every module of this package is imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxvars.registry import Registry, import_submodules

OBJECTIVES = Registry("attack objective")


@dataclasses.dataclass(frozen=True)
class AttackContext:
  """What an objective may use (all frozen, models in eval mode).

  Attributes:
    features: images float32 [B, H, W, 3] in [0, 1] -> normalised item features [B, F]
      through the attacked pipeline (backbone, or a defended system then the backbone).
    score_fn: (users int [...], items int [...], features [..., F]) -> scores [...] (the
      recommender, parameters bound).
    visual_fn: features [..., F] -> the recommender's visual embedding [..., K] (VBPR:
      E f), or None for a recommender without one.
    items: int32 [B], the catalogue indices of the batch's photos.
    table: float32 [I, F], normalised features of every item: the clean table f(x)
      (``consts['features']``), or for a white-box attack under
      ``config.attack.whitebox_table='deployed'`` the attacked system's deployed table
      (f(D(x)) for OURS; :func:`jaxvars.attacks.whitebox.attack_loss`).
    triplets: the batch's inputs of the objective (``Objective.batch_inputs``; for 'bpr'
      the ``item_triplets`` of ``items``, [B, T] arrays), or None.
    constants: the objective's per-catalogue constants (``Objective.constants``), or None.
    num_users: U (objectives over every user).
    logits: images -> ImageNet logits [B, 1000] of the backbone's classifier head (through
      the attacked pipeline), or None for a backbone without one.
  """
  features: Callable[[jax.Array], jax.Array]
  score_fn: Callable
  visual_fn: Callable | None
  items: jax.Array
  table: jax.Array
  triplets: dict | None = None
  constants: dict | None = None
  num_users: int = 0
  logits: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective.

  Attributes:
    loss: ``(ctx, images) -> float32 [B]``, one loss per photo, to maximise (the photos of
      a batch do not interact: PGD keeps each one's best iterate).
    needs_triplets: BPR triplets are sampled per attacked item (``ctx.triplets``).
    random_first_step: the gradient vanishes at the clean image (a distance to it), so
      FGSM takes a random step first (R+FGSM).
    description: one line for the report.
    batch_inputs: ``(items int [N], data, rng, per_role) -> {name: array [N, ...]}``, the
      objective's inputs per attacked item (sharded with the photos), instead of BPR
      triplets; None = triplets when ``needs_triplets``.
    constants: ``(data, rng) -> {name: array}``, inputs shared by every batch.
    needs_logits: the objective reads the backbone's classifier head (``ctx.logits``).
    margin: ``(ctx, images) -> float32 [B]``, the objective's own success criterion as C&W's
      margin g (:mod:`jaxvars.attacks.cw`): the attack has succeeded on photo b where
      ``g_b < -kappa`` (``kappa`` = C&W's confidence, in g's units); None = the objective has
      none, and C&W counts a photo as a success where its ``loss`` exceeds the clean
      photo's by ``config.attack.cw.loss_margin`` (:func:`cw_value`).
  """
  loss: Callable[[AttackContext, jax.Array], jax.Array]
  needs_triplets: bool = False
  random_first_step: bool = False
  description: str = ""
  batch_inputs: Callable | None = None
  constants: Callable | None = None
  needs_logits: bool = False
  margin: Callable[[AttackContext, jax.Array], jax.Array] | None = None


def cw_value(objective: Objective) -> Callable[[AttackContext, jax.Array], jax.Array]:
  """What C&W (:func:`jaxvars.attacks.cw.cw_l2`) raises on ``objective``: minus its margin
  ``-g`` (a photo is adversarial where this exceeds kappa) where the objective defines one,
  else its loss (which :meth:`jaxvars.attacks.spec.AttackSpec.run_loss` makes relative to
  the clean photo's: ``loss(x') - loss(x) - loss_margin``)."""
  if objective.margin is None:
    return objective.loss
  return lambda ctx, images: -objective.margin(ctx, images)


import_submodules(__name__, __path__)
