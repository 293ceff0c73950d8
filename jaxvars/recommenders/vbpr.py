"""VBPR: Visual Bayesian Personalised Ranking (He & McAuley, AAAI 2016).

Two forms of the preference score (DESIGN.md; config ``recommender.form``):

* ``'tang'`` (Tang et al. 2020, AMR; the paper's eq. for x_ui):
  ``x_ui = p_u . (q_i + E f_i)``
* ``'he'`` (He & McAuley 2016): ``x_ui = b_i + g_u . g_i + t_u . (E f_i) + b' . f_i``
  (the global and user biases cancel in BPR and are omitted).

``f_i`` is the (normalised) pooled backbone feature of item i's image, passed in
by the caller, so that attacks can feed features of perturbed images.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxvars.errors import ConfigError
from jaxvars.recommenders.base import RECOMMENDERS, Recommender, RecommenderEntry

FORMS = ("tang", "he")


class VBPR(nn.Module):
  """VBPR scorer.

  Attributes:
    num_users, num_items: U, I.
    feature_dim: F, size of f_i.
    factors: K (p_u, q_i in 'tang'; g_u, g_i in 'he').
    visual_factors: K' (t_u and E f_i in 'he'; ignored by 'tang', where E maps to K).
    form: 'tang' or 'he'.
    init_scale: std of the normal initialisation of every parameter.

  ``__call__(users, items, features)``:
    users: int [...], items: int [...] (same shape), features: float32 [..., F]
    (f of ``items``). Returns float32 scores x_ui [...].
  """
  num_users: int
  num_items: int
  feature_dim: int
  factors: int = 64
  visual_factors: int = 64
  form: str = "tang"
  init_scale: float = 0.01

  def setup(self):
    if self.form not in FORMS:
      raise ValueError(f"VBPR form {self.form!r} is not one of {FORMS}")
    init = nn.initializers.normal(self.init_scale)
    k_visual = self.factors if self.form == "tang" else self.visual_factors
    self.user_factors = self.param("user_factors", init, (self.num_users, self.factors))
    self.item_factors = self.param("item_factors", init, (self.num_items, self.factors))
    self.visual_projection = self.param("visual_projection", init, (self.feature_dim, k_visual))
    if self.form == "he":
      self.user_visual_factors = self.param("user_visual_factors", init,
                                            (self.num_users, self.visual_factors))
      self.item_bias = self.param("item_bias", nn.initializers.zeros, (self.num_items,))
      self.visual_bias = self.param("visual_bias", init, (self.feature_dim,))

  def visual(self, features):
    """The visual embedding E f [..., K'] of item features f [..., F]."""
    return features @ self.visual_projection

  def __call__(self, users, items, features):
    visual = features @ self.visual_projection  # [..., K']
    if self.form == "tang":
      return jnp.sum(self.user_factors[users] * (self.item_factors[items] + visual), axis=-1)
    return (self.item_bias[items]
            + jnp.sum(self.user_factors[users] * self.item_factors[items], axis=-1)
            + jnp.sum(self.user_visual_factors[users] * visual, axis=-1)
            + features @ self.visual_bias)

  def difference(self, users, pos_items, neg_items, pos_features, neg_features):
    """``x_ui - x_uj`` [B] of BPR triplets, with one visual projection ``E (f_i - f_j)``
    instead of two (the score is linear in f; BPR only needs the difference). Equals
    ``self(u, i, f_i) - self(u, j, f_j)`` up to float rounding.

    Args:
      users, pos_items, neg_items: int [B]. pos_features, neg_features: float32 [B, F].
    """
    delta_f = pos_features - neg_features  # [B, F]
    visual = delta_f @ self.visual_projection  # [B, K']
    delta_q = self.item_factors[pos_items] - self.item_factors[neg_items]
    if self.form == "tang":
      return jnp.sum(self.user_factors[users] * (delta_q + visual), axis=-1)
    return (self.item_bias[pos_items] - self.item_bias[neg_items]
            + jnp.sum(self.user_factors[users] * delta_q, axis=-1)
            + jnp.sum(self.user_visual_factors[users] * visual, axis=-1)
            + delta_f @ self.visual_bias)

  def l2_terms(self, users, pos_items, neg_items):
    """Squared L2 norms of the rows a batch of triplets touches, and of the visual weights.

    Args:
      users, pos_items, neg_items: int [B].

    Returns:
      (rows, visual): rows = mean over the batch of ||user rows||^2 + ||pos rows||^2 +
      ||neg rows||^2 (float32 scalar); visual = ||E||^2 (+ ||b'||^2 in 'he').
    """
    sq = lambda a: jnp.sum(jnp.square(a), axis=-1)
    rows = sq(self.user_factors[users]) + sq(self.item_factors[pos_items]) + sq(
        self.item_factors[neg_items])
    visual = jnp.sum(jnp.square(self.visual_projection))
    if self.form == "he":
      rows = rows + sq(self.user_visual_factors[users]) + jnp.square(
          self.item_bias[pos_items]) + jnp.square(self.item_bias[neg_items])
      visual = visual + jnp.sum(jnp.square(self.visual_bias))
    return jnp.mean(rows), visual


def build(rec_config, *, num_users: int, num_items: int, feature_dim: int) -> Recommender:
  """VBPR from ``config.recommender`` (fields form, factors, visual_factors, init_scale,
  reg, reg_visual); AMR (:mod:`jaxvars.recommenders.amr`) builds on it."""
  module = VBPR(num_users=num_users, num_items=num_items, feature_dim=feature_dim,
                factors=rec_config.factors, visual_factors=rec_config.visual_factors,
                form=rec_config.form, init_scale=rec_config.init_scale)
  return Recommender(name="vbpr", label="VBPR", module=module,
                     penalty_weights=(float(rec_config.reg), float(rec_config.reg_visual)))


def validate(rec_config) -> None:
  """Raises ConfigError naming the first bad VBPR field of ``config.recommender``."""
  if rec_config.form not in FORMS:
    raise ConfigError(f"config.recommender.form={rec_config.form!r} is not one of {FORMS}")
  for field in ("factors", "visual_factors"):
    value = rec_config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.recommender.{field}={value!r} must be a positive integer")
  for field in ("reg", "reg_visual", "init_scale"):
    value = rec_config[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"config.recommender.{field}={value!r} must be a number >= 0")


RECOMMENDERS.register("vbpr", RecommenderEntry(build=build, validate=validate))
