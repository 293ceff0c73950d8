"""Loss functions (keyword-only, pure).

Source: paper eq. for L_bpr (section 3.5; He & McAuley 2016; Rendle et al. 2009).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bpr(*, pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
  """Bayesian Personalised Ranking loss, averaged over triplets.

  ``mean(-log sigmoid(x_ui - x_uj))``, computed stably as ``softplus(x_uj - x_ui)``.

  Args:
    pos_scores: float [B], x_ui of the positive items.
    neg_scores: float [B], x_uj of the sampled negatives.

  Returns:
    float32 scalar.
  """
  return jnp.mean(jax.nn.softplus(neg_scores - pos_scores))
