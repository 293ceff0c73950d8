"""``feature``: the embedding-disruption objective, which needs no triplets.

Maximise ``||E f(x') - E f(x)||_2`` in the recommender's visual space (VBPR: the
projection E of the item feature), per photo: the attacked photo's item
embedding moves as far as the budget allows from the clean one, whoever buys the item.
This is the common untargeted feature-space attack on visually-aware recommenders (cf.
TAaMR / Anelli et al.'s feature loss); where the recommender has no visual embedding the
distance is taken between the normalised features themselves.

No success criterion of its own: C&W (:mod:`jaxvars.attacks.cw`) counts a photo as
adversarial where the distance exceeds the clean photo's (1e-6) by
``config.attack.cw.loss_margin`` (units of the visual embedding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def feature_distance(adv_features: jax.Array, clean_features: jax.Array, visual_fn=None):
  """``||E f' - E f||_2`` per item.

  Args:
    adv_features, clean_features: float32 [B, F] normalised item features.
    visual_fn: features [..., F] -> visual embedding [..., K]; None = identity.

  Returns:
    float32 [B]. The distance is floored at 1e-6 (its square at 1e-12) so the gradient is
    finite at ``adv == clean``.
  """
  if visual_fn is not None:
    adv_features, clean_features = visual_fn(adv_features), visual_fn(clean_features)
  sq = jnp.sum(jnp.square(adv_features - clean_features), axis=-1)
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return feature_distance(ctx.features(images), ctx.table[ctx.items], ctx.visual_fn)


OBJECTIVES.register("feature", Objective(
    loss=_loss, needs_triplets=False, random_first_step=True,
    description="move the item's visual embedding E f(x) away from its clean value"))
