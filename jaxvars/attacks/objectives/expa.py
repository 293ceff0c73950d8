"""``expa``: AIP's expert attack (Liu & Larson 2021, eq. 7): move the target item's visual
feature towards a hook: ``min ||f(x') - f_hook||_2`` with f the recommender's (normalised)
backbone feature and f_hook the mean feature of the ``config.targeted.hook_items`` most
popular training items (AIP: the single most interacted item). C&W
(:mod:`jaxvars.attacks.cw`): adversarial where the distance to the hook fell by more than
``config.attack.cw.loss_margin`` (units of the normalised features)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def popular_items(data, n: int) -> np.ndarray:
  """int32 [n]: the most interacted items of the training split (ties by index)."""
  counts = np.bincount(data.train_items, minlength=data.num_items)
  return np.argsort(-counts, kind="stable")[:n].astype(np.int32)


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  hook = jnp.mean(ctx.table[ctx.constants["hook_items"]], axis=0)
  return -optax.safe_norm(ctx.features(images) - hook, 0.0, axis=-1)  # Gradient 0 (not NaN) at 0.


def _constants(data, rng, *, hook_items: int = 1) -> dict:
  del rng
  return {"hook_items": popular_items(data, hook_items)}


OBJECTIVES.register("expa", Objective(
    loss=_loss, constants=_constants,
    description="AIP EXPA: move the item's visual feature towards the popular hook item's"))
