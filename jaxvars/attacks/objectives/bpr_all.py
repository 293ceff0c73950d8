"""``bpr_all``: eq. 3 with every user instead of 8 sampled triplets per role: for the attacked
item k, each of its training buyers u contributes ``-log sigmoid(x_uk - x_uj)`` (with a
sampled negative j of u) and every other user ``-log sigmoid(x_ui - x_uk)`` (with one of u's
training items i); the attacker maximises the sum. C&W's success criterion (:func:`all_user_bpr_margin`): those
pairs are ranked against the training data on average over the users.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective
from jaxvars.data import splits


def _scores(item_features, *, items, bought, score_fn, user_pos, user_neg, table):
  """(x_uk [B, U] of the attacked items for every user, x_uj [1, U] and x_ui [1, U] of each
  user's sampled negative and training item)."""
  b, u = bought.shape
  users = jnp.broadcast_to(jnp.arange(u), (b, u))
  x_uk = score_fn(users, jnp.broadcast_to(items[:, None], (b, u)),
                  jnp.broadcast_to(item_features[:, None, :], (b, u, item_features.shape[-1])))
  x_uj = score_fn(jnp.arange(u), user_neg, table[user_neg])[None, :]
  x_ui = score_fn(jnp.arange(u), user_pos, table[user_pos])[None, :]
  return x_uk, x_uj, x_ui


def all_user_bpr_margin(item_features: jax.Array, *, items: jax.Array, bought: jax.Array,
                        score_fn, user_pos: jax.Array, user_neg: jax.Array,
                        table: jax.Array) -> jax.Array:
  """C&W's margin on :func:`all_user_bpr_loss` (:mod:`jaxvars.attacks.cw`): per item [B],
  the mean over users of ``x_uk - x_uj`` (its buyers) and ``x_ui - x_uk`` (everybody else),
  in score units; negative where those pairs are ranked against training on average.
  Arguments as :func:`all_user_bpr_loss`."""
  x_uk, x_uj, x_ui = _scores(item_features, items=items, bought=bought, score_fn=score_fn,
                             user_pos=user_pos, user_neg=user_neg, table=table)
  return jnp.mean(bought * (x_uk - x_uj) + (1.0 - bought) * (x_ui - x_uk), axis=1)


def all_user_bpr_loss(item_features: jax.Array, *, items: jax.Array, bought: jax.Array,
                      score_fn, user_pos: jax.Array, user_neg: jax.Array,
                      table: jax.Array) -> jax.Array:
  """Per item [B]: the BPR loss of one triplet per user (see the module docstring).

  Args:
    item_features: float32 [B, F] of the attacked photos. items: int32 [B].
    bought: float32 [B, U], 1 where user u bought item k in training.
    score_fn: the recommender's scores (parameters bound).
    user_pos, user_neg: int32 [U], one training item and one sampled negative per user.
    table: float32 [I, F], clean normalised features of every item.
  """
  x_uk, x_uj, x_ui = _scores(item_features, items=items, bought=bought, score_fn=score_fn,
                             user_pos=user_pos, user_neg=user_neg, table=table)
  as_positive = bought * jax.nn.softplus(x_uj - x_uk)
  as_negative = (1.0 - bought) * jax.nn.softplus(x_uk - x_ui)
  return jnp.sum(as_positive + as_negative, axis=1)


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  c = ctx.constants
  return all_user_bpr_loss(ctx.features(images), items=ctx.items,
                           bought=ctx.triplets["bought"].astype(jnp.float32),
                           score_fn=ctx.score_fn, user_pos=c["user_pos"], user_neg=c["user_neg"],
                           table=ctx.table)


def _margin(ctx: AttackContext, images: jax.Array) -> jax.Array:
  c = ctx.constants
  return all_user_bpr_margin(ctx.features(images), items=ctx.items,
                             bought=ctx.triplets["bought"].astype(jnp.float32),
                             score_fn=ctx.score_fn, user_pos=c["user_pos"],
                             user_neg=c["user_neg"], table=ctx.table)


def _bought(items, data, rng, per_role) -> dict:
  """{'bought': bool [N, U]}: whether each user bought each item in training."""
  del rng, per_role
  keys = splits.pair_keys(data.train_users, data.train_items, data.num_items)
  users = np.arange(data.num_users)
  return {"bought": splits.contains(keys, users[None, :] * data.num_items
                                    + np.asarray(items)[:, None])}


def _per_user(data, rng) -> dict:
  """{'user_pos', 'user_neg'}: int32 [U], one training item and one sampled negative of
  each user (the other item of that user's triplet)."""
  order = np.argsort(data.train_users, kind="stable")
  users, items = data.train_users[order], data.train_items[order]
  start = np.searchsorted(users, np.arange(data.num_users))
  count = np.searchsorted(users, np.arange(data.num_users), side="right") - start
  pick = start + (rng.random(data.num_users) * np.maximum(count, 1)).astype(np.int64)
  keys = splits.pair_keys(data.train_users, data.train_items, data.num_items)
  neg = splits.sample_train_negatives(np.arange(data.num_users), data.num_items, keys, rng=rng)
  return {"user_pos": items[np.minimum(pick, len(items) - 1)].astype(np.int32),
          "user_neg": np.asarray(neg, np.int32)}


OBJECTIVES.register("bpr_all", Objective(
    loss=_loss, needs_triplets=True, batch_inputs=_bought, constants=_per_user, margin=_margin,
    description="eq. 3 with one triplet per user (every buyer and every non-buyer)"))
