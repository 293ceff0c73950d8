"""``bpr``: the untargeted VARS attack objective (paper eq. 3-4).

The untargeted VARS attack: perturb the images of the items of
training triplets (u, i, j) so that the BPR loss rises, i.e. the preference order
flips. For a batch of item images we use the triplets each item takes part in
(:func:`jaxvars.data.splits.item_triplets`): the item as the positive i (its
score for its buyers should fall) and as the negative j (its score for
non-buyers should rise). The backbone and the recommender are frozen and in eval mode.

C&W's success criterion (:func:`item_bpr_margin`): the preference order has flipped on
average over the item's triplets.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def _triplet_scores(item_features, *, items, triplets, score_fn, other_features=None,
                    triplet_features=None):
  """The scores of the triplets each item of a batch is in (:func:`item_bpr_loss`'s
  arguments): (x_uk [B, T] of the item for its buyers, x_uj [B, T] of their sampled
  negatives, x_ui [B, T] of the non-buyers' bought items, x_uk2 [B, T] of the item for the
  non-buyers)."""
  if (other_features is None) == (triplet_features is None):
    raise ValueError("give exactly one of other_features (a table [I, F]) and "
                     "triplet_features (per-triplet features [B, T, F])")
  f = item_features[:, None, :]
  k = items[:, None]
  t = triplets
  if triplet_features is None:
    f_j, f_i = other_features[t["pos_negs"]], other_features[t["neg_pos"]]
  else:
    f_j, f_i = triplet_features["pos_negs"], triplet_features["neg_pos"]
  x_uk = score_fn(t["pos_users"], jnp.broadcast_to(k, t["pos_users"].shape),
                  jnp.broadcast_to(f, (*t["pos_users"].shape, f.shape[-1])))
  x_uj = score_fn(t["pos_users"], t["pos_negs"], f_j)
  x_ui = score_fn(t["neg_users"], t["neg_pos"], f_i)
  x_uk2 = score_fn(t["neg_users"], jnp.broadcast_to(k, t["neg_users"].shape),
                   jnp.broadcast_to(f, (*t["neg_users"].shape, f.shape[-1])))
  return x_uk, x_uj, x_ui, x_uk2


def item_bpr_loss(item_features: jax.Array, *, items: jax.Array, triplets: dict,
                  score_fn: Callable, other_features: jax.Array | None = None,
                  triplet_features: dict | None = None) -> jax.Array:
  """BPR loss of the triplets in which each item of a batch takes part, per item.

  The other item of each triplet (the sampled negative j of the item's buyers, the bought
  item i of its non-buyers) is scored with its row of the table ``other_features``, or with
  ``triplet_features``, its features computed per triplet (the defence's joint loss with
  ``config.defense.bpr_other='defended'``: f(D(x_j)), both images of the triplet through the
  denoiser as in the paper's eq. 12). Exactly one of the two is given.

  Args:
    item_features: float32 [B, F], features of the (attacked or denoised) images of ``items``.
    items: int32 [B].
    triplets: from ``item_triplets``: 'pos_users', 'pos_negs', 'pos_mask', 'neg_users',
      'neg_pos', each [B, T].
    score_fn: (users [...], items [...], features [..., F]) -> scores [...] (the recommender,
      parameters bound).
    other_features: float32 [I, F], features of every item, indexed by the other item of
      each triplet: the clean table f(x), or a defended system's deployed table (f(D(x))
      for every item; :func:`jaxvars.attacks.whitebox.attack_loss`).
    triplet_features: {'pos_negs': float32 [B, T, F], 'neg_pos': float32 [B, T, F]}, the
      features of the other item of each triplet, in the layout of ``triplets``.

  Returns:
    float32 [B]: for each item, the sum over its triplets of ``-log sigmoid(x_ui - x_uj)``
    (the item as positive i of its buyers' triplets, and as negative j of non-buyers').

  Raises:
    ValueError: neither or both of ``other_features`` and ``triplet_features``.
  """
  x_uk, x_uj, x_ui, x_uk2 = _triplet_scores(
      item_features, items=items, triplets=triplets, score_fn=score_fn,
      other_features=other_features, triplet_features=triplet_features)
  t = triplets
  as_positive = jnp.sum(t["pos_mask"] * jax.nn.softplus(x_uj - x_uk), axis=1)
  as_negative = jnp.sum(jax.nn.softplus(x_uk2 - x_ui), axis=1)
  return as_positive + as_negative


def item_bpr_margin(item_features: jax.Array, *, items: jax.Array, triplets: dict,
                    score_fn: Callable, other_features: jax.Array) -> jax.Array:
  """C&W's margin on eq. 3 (:mod:`jaxvars.attacks.cw`): the mean, over the triplets each
  item is in, of the preference margin the recommender learnt, ``x_uk - x_uj`` for its
  buyers (k above their sampled negative j) and ``x_ui - x_uk`` for the non-buyers (their
  bought item i above k). Negative where the item's triplets are, on average, ranked
  against the training data (eq. 3's loss over its n valid triplets then exceeds
  ``n log 2``: softplus is convex).

  Args: as :func:`item_bpr_loss` (with the table ``other_features``).

  Returns:
    float32 [B], in score units (the item's valid triplets: masked buyers' ones dropped).
  """
  x_uk, x_uj, x_ui, x_uk2 = _triplet_scores(item_features, items=items, triplets=triplets,
                                            score_fn=score_fn, other_features=other_features)
  mask = triplets["pos_mask"].astype(x_uk.dtype)
  total = jnp.sum(mask * (x_uk - x_uj), axis=1) + jnp.sum(x_ui - x_uk2, axis=1)
  return total / (jnp.sum(mask, axis=1) + x_ui.shape[1])


def _margin(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return item_bpr_margin(ctx.features(images), items=ctx.items, triplets=ctx.triplets,
                         score_fn=ctx.score_fn, other_features=ctx.table)


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return item_bpr_loss(ctx.features(images), items=ctx.items, triplets=ctx.triplets,
                       score_fn=ctx.score_fn, other_features=ctx.table)


OBJECTIVES.register("bpr", Objective(
    loss=_loss, needs_triplets=True, margin=_margin,
    description="paper eq. 3: BPR loss of the training triplets each attacked item is in"))
