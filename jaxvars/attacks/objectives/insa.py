"""``insa``: AIP's insider attack (Liu & Larson 2021, eq. 6): raise the target item's
predicted preference for every user, i.e. its mean score over all users (needs the
recommender's user embeddings: a high-knowledge attack). C&W (:mod:`jaxvars.attacks.cw`):
adversarial where the mean score rose by more than ``config.attack.cw.loss_margin`` (score
units)."""

from __future__ import annotations

import jax

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective
from jaxvars.attacks.objectives.demote import mean_score


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return mean_score(ctx.features(images), items=ctx.items, score_fn=ctx.score_fn,
                    num_users=ctx.num_users)


OBJECTIVES.register("insa", Objective(
    loss=_loss, description="AIP INSA: raise the item's mean predicted score over all users"))
