"""The feature-space attack that AMR trains against (Tang et al. 2020, "Adversarial Training
Towards Robust Multimedia Recommender System", section 3 and the robustness study of
section 5): every item's visual feature f_i is moved by the fast-gradient perturbation

    delta_i = eps * G_i / ||G_i||_2,   G = d/dF sum_{(u, i, j)} -log sigmoid(x_ui - x_uj),

the gradient of the BPR loss over the training pairs (u, i), each with one negative j drawn
uniformly from the catalogue, with respect to the whole feature table F [I, F]. The ranking is
then the held-out item among its sampled negatives (the run's protocol) on F + delta.

This is the perturbation AMR's adversarial term is trained on (the per-triplet version,
:func:`jaxvars.recommenders.amr.fgm_perturbation`), applied once to the catalogue, as Tang et
al. measure robustness; it lives in feature space (no photo realises it), so it is a white-box
threat model on the recommender's input, not on the images. An item in no triplet (neither
a training positive nor a drawn negative) has G_i = 0 and is not moved.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.evaluation.ranking import candidate_matrix, candidate_scores, positive_ranks


@functools.partial(jax.jit, static_argnames=("recommender",))
def _table_gradient(recommender, params, users, pos, neg, weight, table):
  def loss(f):
    x = recommender.difference(params, users, pos, neg, f[pos], f[neg])
    return -jnp.sum(weight * jax.nn.log_sigmoid(x))
  return jax.grad(loss)(table)


def perturbation(recommender, params, features, train_users: np.ndarray,
                 train_items: np.ndarray, *, eps: float, key: jax.Array,
                 batch_size: int = 8192) -> np.ndarray:
  """Tang et al.'s perturbation of the whole item-feature table.

  Args:
    recommender, params: a :class:`jaxvars.recommenders.Recommender` with a visual term
      (``uses_features``) and its parameters.
    features: float32 [I, F], the clean normalised item features (``consts['features']``).
    train_users, train_items: int [N], the training pairs.
    eps: the L2 norm of each item's perturbation row (normalised-feature units, as
      ``config.recommender.adv_eps``; >= 0).
    key: PRNG key of the negatives (one per pair, uniform over the I items).
    batch_size: pairs per jitted gradient call (the last batch is padded with weight 0).

  Returns:
    float32 [I, F]: delta, ``eps * G_i / ||G_i||`` per row, zero where G_i = 0 (an item in
    no triplet).

  Raises:
    ValueError: eps < 0, or a recommender without a visual term (the attack cannot move it).
  """
  if eps < 0:
    raise ValueError(f"feature attack: eps={eps} must be >= 0")
  if not getattr(recommender, "uses_features", True):
    raise ValueError(f"feature attack: recommender {recommender.name!r} has no visual term")
  users = np.asarray(train_users, np.int32)
  pos = np.asarray(train_items, np.int32)
  table = jnp.asarray(features, jnp.float32)
  num_items = table.shape[0]
  neg = np.asarray(jax.random.randint(key, (len(pos),), 0, num_items), np.int32)
  grad = jnp.zeros_like(table)
  for start in range(0, len(pos), batch_size):
    sl = slice(start, start + batch_size)
    u, i, j = users[sl], pos[sl], neg[sl]
    pad = batch_size - len(u)
    w = np.concatenate([np.ones(len(u), np.float32), np.zeros(pad, np.float32)])
    u, i, j = (np.concatenate([a, np.zeros(pad, np.int32)]) for a in (u, i, j))
    grad = grad + _table_gradient(recommender, params, jnp.asarray(u), jnp.asarray(i),
                                  jnp.asarray(j), jnp.asarray(w), table)
  grad = np.asarray(grad, np.float64)
  norm = np.linalg.norm(grad, axis=1, keepdims=True)
  unit = np.divide(grad, norm, out=np.zeros_like(grad), where=norm > 0)
  return (eps * unit).astype(np.float32)


def ranks(recommender, params, features, data, *, eps: float, key: jax.Array,
          batch_users: int) -> np.ndarray:
  """0-based rank of each user's held-out item among its sampled negatives (the run's
  protocol, :mod:`jaxvars.evaluation.ranking`) when every item feature carries
  :func:`perturbation` at ``eps``.

  Args:
    data: the run's :class:`jaxvars.data.pipeline.RecData` (training pairs, held-out items,
      negatives).
    batch_users: users per jitted scoring call.

  Returns:
    int64 [U].
  """
  delta = perturbation(recommender, params, features, data.train_users, data.train_items,
                       eps=eps, key=key)
  attacked = jnp.asarray(features, jnp.float32) + jnp.asarray(delta)
  cands = candidate_matrix(data.test_items, data.eval_negatives)
  scores = candidate_scores(recommender, params, attacked, cands, batch_users)
  return positive_ranks(scores[:, 0], scores[:, 1:])
