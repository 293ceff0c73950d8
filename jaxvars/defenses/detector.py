"""Contrastive adversarial-example detector (paper section 3.4, eq. for z).

The detector embeds an image as ``z = W2 relu(W1 h)`` where ``h`` is the pooled
feature of the backbone (the recommender's frozen one) and the MLP is
:class:`ProjectionHead`. Embeddings are L2-normalised.
The score of an input is ``||z(x_in) - z(D(x_in))||_2``; a score above a threshold
means "adversarial".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ProjectionHead(nn.Module):
  """MLP projection head ``W2 relu(W1 h)`` followed by L2 normalisation.

  Attributes:
    hidden: width of W1. out: embedding dimension (paper: 128).

  ``__call__(h)``: float32 [B, F] pooled features -> float32 [B, out], unit norm.
  """
  hidden: int = 512
  out: int = 128

  @nn.compact
  def __call__(self, h):
    z = nn.Dense(self.out, name="w2")(nn.relu(nn.Dense(self.hidden, name="w1")(h)))
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


def detection_score(z_input: jax.Array, z_denoised: jax.Array) -> jax.Array:
  """The detector's score (paper 3.4): the Euclidean distance [B] between the embeddings
  [B, D] of inputs and of their denoised versions; above the threshold = adversarial."""
  return jnp.linalg.norm(z_input - z_denoised, axis=-1)
