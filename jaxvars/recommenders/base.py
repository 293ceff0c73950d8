"""The recommender interface and registry.

A recommender scores (user, item) pairs from learned factors and, for visually-aware ones,
the item's visual feature f_i. Training (BPR), the attacks and evaluation talk to it only
through :class:`Recommender`, so a new model (BPR-MF without a visual term, AMR, DVBPR
whose item features come from a trainable CNN) is one file that registers a builder in
``RECOMMENDERS``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvars.registry import Registry

RECOMMENDERS = Registry("recommender")

# Where a recommender's item features come from.
FEATURES_FROM_TABLE = "table"  # A frozen backbone's features, computed once per image set.
FEATURES_FROM_IMAGES = "images"  # A trainable CNN over the item photos (DVBPR): not a table.


@dataclasses.dataclass(frozen=True)
class Recommender:
  """A recommender bound to its data sizes and regularisation (static, hashable).

  Attributes:
    name: the registry name (also the result-row name of the undefended system).
    label: the name printed in tables ('VBPR').
    module: a flax module ``__call__(users int [...], items int [...], features float32
      [..., F]) -> scores float32 [...]``; it also has a method ``l2_terms(users, pos, neg)``
      returning a tuple of unweighted L2 terms (float32 scalars), and, when it has a visual
      term, ``visual(features [..., F]) -> [..., K]`` (the item's visual embedding).
      Optionally ``difference(users, pos, neg, pos_features, neg_features) -> [B]``, a
      cheaper ``x_ui - x_uj`` for BPR training (see :meth:`difference`).
    penalty_weights: the weights of ``l2_terms``, in order.
    uses_features: False for a recommender without a visual term (image attacks cannot
      move it).
    feature_source: FEATURES_FROM_TABLE or FEATURES_FROM_IMAGES.
  """
  name: str
  label: str
  module: nn.Module
  penalty_weights: tuple[float, ...]
  uses_features: bool = True
  feature_source: str = FEATURES_FROM_TABLE

  def init(self, key: jax.Array, feature_dim: int) -> dict:
    """Initial parameters (a pytree) for item features of size ``feature_dim``."""
    index = jnp.zeros((1,), jnp.int32)
    return self.module.init(key, index, index, jnp.zeros((1, feature_dim)))["params"]

  def score(self, params, users, items, features):
    """Scores x_ui [...] of ``users``, ``items`` (int [...]) with item features [..., F]."""
    return self.module.apply({"params": params}, users, items, features)

  def difference(self, params, users, pos, neg, pos_features, neg_features):
    """``x_ui - x_uj`` [B] of BPR triplets (users, pos, neg int [B]; features [B, F]): the
    module's ``difference`` method where it has one (VBPR: one visual projection of
    ``f_i - f_j``), else two calls of ``score``."""
    if hasattr(self.module, "difference"):
      return self.module.apply({"params": params}, users, pos, neg, pos_features, neg_features,
                               method="difference")
    return (self.score(params, users, pos, pos_features)
            - self.score(params, users, neg, neg_features))

  def score_fn(self, params) -> Callable:
    """``(users, items, features) -> scores`` with ``params`` bound."""
    return functools.partial(self.module.apply, {"params": params})

  def visual_fn(self, params) -> Callable | None:
    """``features [..., F] -> visual embedding [..., K]`` (VBPR: E f), or None where the
    module has no ``visual`` method (a recommender without a visual term)."""
    if not self.uses_features or not hasattr(self.module, "visual"):
      return None
    return functools.partial(self.module.apply, {"params": params}, method="visual")

  def penalty_terms(self, params, users, pos, neg) -> tuple:
    """The weighted L2 terms of a batch of triplets (add them to the BPR loss in order)."""
    terms = self.module.apply({"params": params}, users, pos, neg, method="l2_terms")
    return tuple(w * t for w, t in zip(self.penalty_weights, terms))


def build_recommender(rec_config, *, num_users: int, num_items: int,
                      feature_dim: int) -> Recommender:
  """The registered recommender ``rec_config.name`` (``config.recommender``).

  Raises:
    ConfigError: an unknown name.
  """
  builder = RECOMMENDERS.get(rec_config.name, "config.recommender.name")
  return builder.build(rec_config, num_users=num_users, num_items=num_items,
                       feature_dim=feature_dim)


@dataclasses.dataclass(frozen=True)
class RecommenderEntry:
  """A registry entry: ``build(rec_config, num_users=, num_items=, feature_dim=)`` and
  ``validate(rec_config)`` (raises ConfigError naming a bad field of its own)."""
  build: Callable[..., Recommender]
  validate: Callable[..., None] = lambda rec_config: None
