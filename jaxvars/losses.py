"""Loss functions (keyword-only, pure).

Source: paper eq. for L_bpr (section 3.5; He & McAuley 2016; Rendle et al. 2009).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def content(*, clean: jax.Array, denoised: jax.Array) -> jax.Array:
  """Content loss ``||x_clean - D(x)||^2``, as the mean over pixels and channels.

  Args: clean, denoised: float32 [B, H, W, 3] in [0, 1]. Returns: float32 scalar.
  """
  return jnp.mean(jnp.square(clean - denoised))


def perceptual(*, clean_maps: dict, denoised_maps: dict,
               stages=("stage2", "stage3", "stage4")) -> jax.Array:
  """Perceptual loss ``sum_s ||phi_s(x_clean) - phi_s(D(x))||^2`` over the backbone's
  stages 2-4 (paper 3.3; :data:`jaxvars.backbones.PERCEPTUAL_MAPS`).

  Each stage's squared error is averaged over its elements, then summed over stages.

  Args:
    clean_maps, denoised_maps: backbone outputs (dicts of [B, h_s, w_s, C_s]).
  """
  return sum(jnp.mean(jnp.square(clean_maps[s] - denoised_maps[s])) for s in stages)


def info_nce(*, pos_sim: jax.Array, neg_sim: jax.Array, temperature: float) -> jax.Array:
  """InfoNCE (Oord et al. 2018) with several positive and negative pairs per example.

  For every positive pair p of example b:
  ``-log( exp(s_bp / t) / (exp(s_bp / t) + sum_n exp(s_bn / t)) )``, averaged over b, p.

  Args:
    pos_sim: float32 [B, P] similarities of the positive pairs.
    neg_sim: float32 [B, N] similarities of the negative pairs.
    temperature: t > 0.

  Returns:
    float32 scalar.
  """
  pos = pos_sim / temperature
  neg = jax.nn.logsumexp(neg_sim / temperature, axis=-1, keepdims=True)  # [B, 1]
  return jnp.mean(jnp.logaddexp(pos, neg) - pos)


def detector_pair_similarities(*, z_clean, z_clean_denoised, z_adv, z_adv_denoised):
  """Cosine similarities of the paper's pairs (Figure 5), from unit-norm embeddings [B, D].

  Positive pairs: (x, D(x)), (x, D(x_adv)). Negative pairs: (x_adv, x), (x_adv, D(x_adv)).

  Returns:
    (pos_sim [B, 2], neg_sim [B, 2]).
  """
  dot = lambda a, b: jnp.sum(a * b, axis=-1)
  pos = jnp.stack([dot(z_clean, z_clean_denoised), dot(z_clean, z_adv_denoised)], axis=-1)
  neg = jnp.stack([dot(z_adv, z_clean), dot(z_adv, z_adv_denoised)], axis=-1)
  return pos, neg


def nt_xent(*, z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent loss (Chen et al. 2020): InfoNCE over 2N views of N images.

  Each view's positive is the other view of the same image; its negatives are the other
  2N - 2 views. Cosine similarity over unit-normalised embeddings, divided by ``temperature``.

  Args:
    z1, z2: float32 [N, D], the embeddings of two views of the same N images.

  Returns:
    float32 scalar, averaged over the 2N views.
  """
  z = jnp.concatenate([z1, z2])
  z = z / optax.safe_norm(z, 1e-8, axis=-1, keepdims=True)  # Finite gradient at z = 0.
  n = z1.shape[0]
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(log_prob[jnp.arange(2 * n), positive])
