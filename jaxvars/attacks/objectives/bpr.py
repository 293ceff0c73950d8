"""``bpr``: the untargeted VARS attack objective (paper eq. 3-4).

The untargeted VARS attack: perturb the images of the items of
training triplets (u, i, j) so that the BPR loss rises, i.e. the preference order
flips. For a batch of item images we use the triplets each item takes part in
(:func:`jaxvars.data.splits.item_triplets`): the item as the positive i (its
score for its buyers should fall) and as the negative j (its score for
non-buyers should rise). The backbone and the recommender are frozen and in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def item_bpr_loss(item_features: jax.Array, *, items: jax.Array, triplets: dict,
                  score_fn: Callable, other_features: jax.Array) -> jax.Array:
  """BPR loss of the triplets in which each item of a batch takes part, per item.

  Args:
    item_features: float32 [B, F], features of the (attacked or denoised) images of ``items``.
    items: int32 [B].
    triplets: from ``item_triplets``: 'pos_users', 'pos_negs', 'pos_mask', 'neg_users',
      'neg_pos', each [B, T].
    score_fn: (users [...], items [...], features [..., F]) -> scores [...] (the recommender,
      parameters bound).
    other_features: float32 [I, F], clean features of the other item of each triplet.

  Returns:
    float32 [B]: for each item, the sum over its triplets of ``-log sigmoid(x_ui - x_uj)``
    (the item as positive i of its buyers' triplets, and as negative j of non-buyers').
  """
  f = item_features[:, None, :]
  k = items[:, None]
  t = triplets
  x_uk = score_fn(t["pos_users"], jnp.broadcast_to(k, t["pos_users"].shape),
                  jnp.broadcast_to(f, (*t["pos_users"].shape, f.shape[-1])))
  x_uj = score_fn(t["pos_users"], t["pos_negs"], other_features[t["pos_negs"]])
  as_positive = jnp.sum(t["pos_mask"] * jax.nn.softplus(x_uj - x_uk), axis=1)
  x_ui = score_fn(t["neg_users"], t["neg_pos"], other_features[t["neg_pos"]])
  x_uk2 = score_fn(t["neg_users"], jnp.broadcast_to(k, t["neg_users"].shape),
                   jnp.broadcast_to(f, (*t["neg_users"].shape, f.shape[-1])))
  as_negative = jnp.sum(jax.nn.softplus(x_uk2 - x_ui), axis=1)
  return as_positive + as_negative


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return item_bpr_loss(ctx.features(images), items=ctx.items, triplets=ctx.triplets,
                       score_fn=ctx.score_fn, other_features=ctx.table)


OBJECTIVES.register("bpr", Objective(
    loss=_loss, needs_triplets=True,
    description="paper eq. 3: BPR loss of the training triplets each attacked item is in"))
