"""AlexRank: the pure visual nearest-neighbour ranker of AIP (Liu & Larson, "Adversarial Item
Promotion: Vulnerabilities at the Core of Top-N Recommenders that Use Images to Address Cold
Start", WWW 2021, section 3.2.1, eq. 1).

A user's score for an item is minus the mean squared Euclidean distance between the item's
visual feature and the features of the items the user bought in training:

  p_ui = -(1 / |I_u+|) sum_{j in I_u+} ||f_i - f_j||^2                        (eq. 1)

with I_u+ the *set* of u's training items (a repeated pair counts once) and f the item
features the recommender sees: here the frozen backbone's normalised table
(``consts['features']``, ``config.backbone.feature_norm``; AIP's is AlexNet's fc7, hence the
name), the table VBPR trains on. Expanding the square, with g = f - c for a fixed centre c
(eq. 1 is a mean of distances: the same for f and for f - c),

  p_ui = -||g_i||^2 + 2 g_i . m_u - s_u,
  m_u = (1 / |I_u+|) sum_{j in I_u+} g_j  (float32 [U, F]),
  s_u = (1 / |I_u+|) sum_{j in I_u+} ||g_j||^2  (float32 [U]),

which equals eq. 1 exactly (up to float32 rounding; tests/test_alexrank.py checks it against
the double loop over each user's items). The parameters are ``center`` c (float32 [F], the
mean row of the feature table the fit sees), ``user_mean`` m_u and ``user_sq_norm`` s_u:
computed in closed form (:func:`user_profiles`, in float64 on the host) by
:meth:`jaxvars.recommenders.Recommender.fit` instead of trained (the recommender has a
``fit_fn`` and no training stages), and checkpointed and restored like any recommender's
parameters. s_u shifts all of u's scores by one constant: it changes no ranking, only the
level of the scores (which eq. 1 fixes). The centre is for precision: the expanded terms
are each about ||g||^2 and cancel down to a squared distance, so in float32 the score is
exact to about 1e-7 ||g||^2. Standardised features (``feature_norm='standardize'``, the
default) are centred already; raw ReLU features (``'none'``) share a large common
component, which c removes.

The attacks see AlexRank through ``score_fn`` alone: 'bpr', 'bpr_all', 'insa' (the mean of
p_ui over all users is eq. 6's AlexRank objective divided by the number of users, a positive
constant), 'demote' score with it, and 'expa' and 'taamr' do not read the recommender. It has
no ``visual`` method: its visual space is the feature space itself, and that is where the
'feature' objective measures its distance when ``visual_fn`` is None.

A defended system (a denoiser D in front of the backbone) scores its items with f(D(x_i)),
while the profiles m_u, s_u stay those of the clean table f(x_j): they are fitted once, not
refitted per system. Unlike VBPR's score, which is linear in f_i (a shift of every item's
feature by one vector moves all of a user's scores by one constant), eq. 1 is quadratic in
f_i: a systematic shift delta of the defended features adds the item term -2 delta . f_i
to p_ui (eq. 1 ranks by ||f_i + delta - m_u||), so a defence that moves every feature the
same way reorders AlexRank's ranking where VBPR's stays as it was. Refitting the profiles
on the defended table (what a platform deploying D on its whole catalogue would do) is not
done here.

A user without any training item has no eq. 1 (an empty mean). The data pipeline cannot
produce one (it refuses a user with fewer than 2 distinct items, since leave-one-out holds
one out; the default filter keeps users with >= 5), and :func:`user_profiles` refuses it
with a DataError naming such users rather than give them an arbitrary score.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.errors import DataError
from jaxvars.recommenders.base import RECOMMENDERS, Recommender, RecommenderEntry

_CHUNK = 1 << 14  # Training pairs (resp. items) per host block of float64 rows.


class AlexRank(nn.Module):
  """AlexRank scorer (eq. 1 in its expanded form; see the module docstring).

  Attributes:
    num_users: U. feature_dim: F.

  Parameters: ``center`` c float32 [F], ``user_mean`` m_u float32 [U, F] and
  ``user_sq_norm`` s_u float32 [U] (zeros until fitted).

  ``__call__(users, items, features)``: users int [...], items int [...] (unused: the score
  depends on the item only through its feature), features float32 [..., F] (f of ``items``);
  broadcasting as in the recommender interface (e.g. users [B, 1], features [1, I, F]).
  Returns float32 scores p_ui [...].
  """
  num_users: int
  feature_dim: int

  def setup(self):
    self.center = self.param("center", nn.initializers.zeros, (self.feature_dim,), jnp.float32)
    self.user_mean = self.param("user_mean", nn.initializers.zeros,
                                (self.num_users, self.feature_dim), jnp.float32)
    self.user_sq_norm = self.param("user_sq_norm", nn.initializers.zeros, (self.num_users,),
                                   jnp.float32)

  def __call__(self, users, items, features):
    del items
    g = features - self.center
    # g_i . m_u as an einsum: where users and features broadcast (users [B, 1], features
    # [1, I, F]: the full ranking) it is one matrix product, never a [B, I, F] array; at
    # full float32 precision (TF32, a GPU's default, would cost ~1e-3 |g||m|, where the
    # score needs ~1e-7 ||g||^2).
    dot = jnp.einsum("...f,...f->...", g, self.user_mean[users],
                     precision=jax.lax.Precision.HIGHEST)
    return 2.0 * dot - jnp.sum(jnp.square(g), axis=-1) - self.user_sq_norm[users]

  def l2_terms(self, users, pos_items, neg_items):
    """None: AlexRank is not trained."""
    del users, pos_items, neg_items
    return ()


def user_profiles(train_users, train_items, features, num_users: int):
  """(c, m, s): the centre c (the mean row of ``features``), and each user's mean centred
  training-item feature m_u and mean squared norm s_u of the centred features.

  Args:
    train_users, train_items: int [N], the training pairs (a repeated pair counts once:
      I_u+ is a set).
    features: float32 [I, F], the item feature table.
    num_users: U.

  Returns:
    (c float32 [F], m float32 [U, F], s float32 [U]), accumulated in float64 (from the
    centred rows f_j - c with c as returned, in float32).

  Raises:
    ValueError: pairs of different lengths or out of range.
    DataError: a user in [0, U) without a training item (eq. 1 is an empty mean there).
  """
  users = np.asarray(train_users).astype(np.int64).reshape(-1)
  items = np.asarray(train_items).astype(np.int64).reshape(-1)
  f = np.asarray(features, np.float32)
  num_items, dim = f.shape
  if users.shape != items.shape:
    raise ValueError(f"train_users [{users.size}] and train_items [{items.size}] differ in "
                     "length")
  if users.size and (users.min() < 0 or users.max() >= num_users or items.min() < 0
                     or items.max() >= num_items):
    raise ValueError(f"training pairs out of range: users must be in [0, {num_users}), items "
                     f"in [0, {num_items})")
  keys = np.unique(users * num_items + items)  # Distinct pairs, sorted by user then item.
  users, items = keys // num_items, keys % num_items
  counts = np.bincount(users, minlength=num_users)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise DataError(
        f"AlexRank: {empty.size} of {num_users} users have no training item (e.g. user "
        f"indices {empty[:5].tolist()}); eq. 1 averages over the user's training items and is "
        "undefined without one")
  center = np.zeros(dim, np.float64)
  for a in range(0, num_items, _CHUNK):
    center += np.sum(f[a:a + _CHUNK], axis=0, dtype=np.float64)
  center = (center / max(num_items, 1)).astype(np.float32)  # As the scores subtract it.
  rows = lambda idx: f[idx].astype(np.float64) - center  # Centred rows [len(idx), F].
  sq_norms = np.empty(num_items, np.float64)
  for a in range(0, num_items, _CHUNK):
    sq_norms[a:a + _CHUNK] = np.sum(np.square(rows(slice(a, a + _CHUNK))), axis=1)
  sums = np.zeros((num_users, dim), np.float64)
  for a in range(0, keys.size, _CHUNK):
    u = users[a:a + _CHUNK]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])  # u is sorted: one segment per user.
    sums[u[starts]] += np.add.reduceat(rows(items[a:a + _CHUNK]), starts, axis=0)
  s = np.bincount(users, weights=sq_norms[items], minlength=num_users) / counts
  return center, (sums / counts[:, None]).astype(np.float32), s.astype(np.float32)


def fit(params, train_users, train_items, features) -> dict:
  """AlexRank's ``Recommender.fit_fn``: ``params`` with c, m_u and s_u of the training pairs
  (:func:`user_profiles`; U from ``params``)."""
  c, m, s = user_profiles(train_users, train_items, features, params["user_mean"].shape[0])
  return dict(params, center=jnp.asarray(c), user_mean=jnp.asarray(m),
              user_sq_norm=jnp.asarray(s))


def build(rec_config, *, num_users: int, num_items: int, feature_dim: int) -> Recommender:
  """AlexRank (it reads no field of ``config.recommender`` besides the name)."""
  del rec_config, num_items
  return Recommender(name="alexrank", label="AlexRank",
                     module=AlexRank(num_users=num_users, feature_dim=feature_dim),
                     penalty_weights=(), fit_fn=fit)


RECOMMENDERS.register("alexrank", RecommenderEntry(build=build))
