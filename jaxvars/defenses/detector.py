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
import optax


class ProjectionHead(nn.Module):
  """MLP projection head ``W2 relu(W1 h)`` followed by L2 normalisation.

  Attributes:
    hidden: width of W1. out: embedding dimension (paper: 128).
    dtype: computation dtype of W1 and W2 (``config.dtype``; parameters stay float32); z
      is cast to float32 before its normalisation.

  ``__call__(h)``: float32 [B, F] pooled features -> float32 [B, out], unit norm.
  """
  hidden: int = 512
  out: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = jnp.asarray(h).astype(self.dtype)
    z = nn.Dense(self.out, dtype=self.dtype, name="w2")(
        nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="w1")(h)))
    z = z.astype(jnp.float32)
    # optax.safe_norm: a finite gradient where z = 0 (a photo whose pooled features are all
    # zero, e.g. a pure white one through a ReLU6 backbone; jnp.linalg.norm's is NaN there).
    return z / optax.safe_norm(z, 1e-8, axis=-1, keepdims=True)


def detection_score(z_input: jax.Array, z_denoised: jax.Array) -> jax.Array:
  """The detector's score (paper 3.4): the Euclidean distance [B] between the embeddings
  [B, D] of inputs and of their denoised versions; above the threshold = adversarial."""
  return optax.safe_norm(z_input - z_denoised, 0.0, axis=-1)  # Gradient 0, not NaN, at 0.
