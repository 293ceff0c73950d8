"""BPR-MF: matrix factorisation trained with BPR (Rendle et al. 2009), no visual term.

``x_ui = b_i + p_u . q_i``. The baseline of every visually-aware recommender paper: its
scores do not depend on the item photos, so image attacks cannot move it (its rows under
attack equal its clean rows) while it also cannot use them for cold items.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxvars.errors import ConfigError
from jaxvars.recommenders.base import RECOMMENDERS, Recommender, RecommenderEntry


class BPRMF(nn.Module):
  """BPR-MF scorer.

  Attributes:
    num_users, num_items: U, I. factors: K. init_scale: std of the normal initialisation.

  ``__call__(users, items, features)``: users, items int [...]; ``features`` is accepted
  for the recommender interface and ignored. Returns float32 scores [...].
  """
  num_users: int
  num_items: int
  factors: int = 64
  init_scale: float = 0.01

  def setup(self):
    init = nn.initializers.normal(self.init_scale)
    self.user_factors = self.param("user_factors", init, (self.num_users, self.factors))
    self.item_factors = self.param("item_factors", init, (self.num_items, self.factors))
    self.item_bias = self.param("item_bias", nn.initializers.zeros, (self.num_items,))

  def __call__(self, users, items, features=None):
    return self.item_bias[items] + jnp.sum(self.user_factors[users] * self.item_factors[items],
                                           axis=-1)

  def l2_terms(self, users, pos_items, neg_items):
    """(rows,): the mean over the batch of the squared norms of the touched rows (user,
    positive and negative item factors and biases)."""
    sq = lambda a: jnp.sum(jnp.square(a), axis=-1)
    rows = (sq(self.user_factors[users]) + sq(self.item_factors[pos_items])
            + sq(self.item_factors[neg_items]) + jnp.square(self.item_bias[pos_items])
            + jnp.square(self.item_bias[neg_items]))
    return (jnp.mean(rows),)


def _build(rec_config, *, num_users: int, num_items: int, feature_dim: int) -> Recommender:
  module = BPRMF(num_users=num_users, num_items=num_items, factors=rec_config.factors,
                 init_scale=rec_config.init_scale)
  return Recommender(name="bprmf", label="BPR-MF", module=module,
                     penalty_weights=(float(rec_config.reg),), uses_features=False)


def _validate(rec_config) -> None:
  if not isinstance(rec_config.factors, int) or rec_config.factors <= 0:
    raise ConfigError(f"config.recommender.factors={rec_config.factors!r} must be a positive "
                      "integer")


RECOMMENDERS.register("bprmf", RecommenderEntry(build=_build, validate=_validate))
