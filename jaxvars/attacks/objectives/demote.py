"""``demote``: lower the attacked item's mean predicted score over all users (the negative of
AIP's INSA objective, Liu & Larson 2021): a score drop for everybody, buyers or not, so it
also moves items without a training buyer (about 40% of H&M's held-out items), where
eq. 3's triplets can only raise the item's score.

No success criterion of its own: C&W (:mod:`jaxvars.attacks.cw`) counts a photo as
adversarial where the item's mean score fell by more than ``config.attack.cw.loss_margin``
(score units).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def mean_score(item_features: jax.Array, *, items: jax.Array, score_fn, num_users: int):
  """Mean over all ``num_users`` users of x_ui for each item [B] with features [B, F]."""
  users = jnp.arange(num_users)
  b = items.shape[0]
  scores = score_fn(jnp.broadcast_to(users, (b, num_users)),
                    jnp.broadcast_to(items[:, None], (b, num_users)),
                    jnp.broadcast_to(item_features[:, None, :],
                                     (b, num_users, item_features.shape[-1])))
  return jnp.mean(scores, axis=1)


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return -mean_score(ctx.features(images), items=ctx.items, score_fn=ctx.score_fn,
                     num_users=ctx.num_users)


OBJECTIVES.register("demote", Objective(
    loss=_loss, description="lower the item's mean predicted score over all users "
                            "(the negative of AIP's INSA)"))
