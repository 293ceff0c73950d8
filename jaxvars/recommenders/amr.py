"""AMR: Adversarial Multimedia Recommendation (Tang, Du, He, Yuan, Tian & Chua, "Adversarial
Training Towards Robust Multimedia Recommender System", IEEE TKDE 32(5), 2020; arXiv
1809.07062; the authors' code: github.com/duxy-me/AMR).

The VBPR model (:class:`jaxvars.recommenders.vbpr.VBPR` and its ``config.recommender``
fields: form, factors, visual_factors, init_scale, reg, reg_visual) trained in two stages
(:class:`jaxvars.recommenders.TrainingStage`), as the securing-VARS paper (section 4.3)
trains it: VBPR's ``epochs`` of BPR ('bpr'), then ``adv_epochs`` epochs of fine-tuning
with the adversarial regulariser ('adversarial'; the paper: "another five epochs
fine-tuning the model ... in an adversarial training way as described in (Tang et al.,
2020)"). The optimiser and its schedule go on from the first stage (the adversarial
epochs run at the dropped learning rate).

The adversarial objective (Tang et al. section 4; as AIP, Liu & Larson, WWW 2021, section
7.1, eq. 11, restates it), per triplet (u, i, j) with item features f_i, f_j (normalised:
``config.backbone.feature_norm``):

  g_k = d L_bpr(u, i, j) / d f_k                      for k in {i, j}
  delta_k = adv_eps * g_k / ||g_k||_2                  (one row of F, stop_gradient)
  L = L_bpr(f) + adv_weight * L_bpr(f + delta) + the L2 terms

the fast-gradient (L2) perturbation of the positive and the negative item's feature that
raises the triplet's BPR loss most to first order, at the current parameters.

Values (``configs/joint.py``): ``adv_weight`` (lambda) = 1, as Tang et al.'s released run
script (``run.sh``: ``lmd='1.'``) and AIP section 7.1 (lambda_adv = 1). ``adv_eps``: the
run script's ``eps='0.1'`` is an L2 norm per item row on features divided by the largest
|entry| of the whole feature table (``Dataset.preload``: ``emb_image / max(|emb_image|)``);
here features are standardised, so the default keeps its size relative to a typical
feature row instead (see the config comment: 0.1 is 1.4% of the median row norm of
max-scaled EfficientNet-Lite0 features of H&M photos at 96 px, and 1.4% of the median
standardised row norm, 31, is 0.42).

Differences from the authors' code, on purpose: (1) each triplet gets its own delta (the
gradient of its own loss), where their code differentiates the batch's summed loss with
respect to the whole feature table, so an item drawn in several triplets of a batch gets
one delta from the sum of their gradients (in a batch where no item repeats the two agree);
(2) the direction is computed from ``-(x_ui - x_uj)``, whose gradient is the BPR loss's
times the triplet's factor ``1 / sigmoid(-(x_ui - x_uj))`` > 0, which cancels in the
normalisation: the same delta, without the underflow of sigmoid(-x) to 0 (a zero
gradient) on triplets the model already ranks by a wide margin.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvars import losses
from jaxvars.errors import ConfigError
from jaxvars.recommenders import dvbpr, vbpr
from jaxvars.recommenders.base import (BPR_STAGE, RECOMMENDERS, Recommender, RecommenderEntry,
                                       TrainingStage)

ADVERSARIAL_STAGE = "adversarial"  # The second stage's name (history rows, progress bar).
OWN_FIELDS = ("adv_epochs", "adv_eps", "adv_weight")  # config.recommender fields only AMR reads.


def _unit_rows(g: jax.Array) -> jax.Array:
  """``g / ||g||_2`` per row of g [B, F] (L2 over the last axis); a zero row stays zero."""
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=-1, keepdims=True))
  return jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)


def fgm_perturbation(recommender: Recommender, params, users, pos, neg, pos_features,
                     neg_features, *, eps: float) -> tuple[jax.Array, jax.Array]:
  """Tang et al.'s adversarial perturbation of the item features of BPR triplets.

  Args:
    recommender: a :class:`jaxvars.recommenders.Recommender` with visual features (its
      ``difference`` gives x_ui - x_uj).
    params: its parameters (treated as constants: no gradient flows through the result).
    users, pos, neg: int32 [B], the triplets (u, i, j).
    pos_features, neg_features: float32 [B, F], f_i and f_j (normalised features).
    eps: the L2 norm of each perturbation row (feature units; >= 0).

  Returns:
    (delta_pos, delta_neg): float32 [B, F], ``eps * g / ||g||_2`` per row with g the
    gradient of the triplet's BPR loss ``-log sigmoid(x_ui - x_uj)`` with respect to f_i
    (resp. f_j); a row whose gradient is zero (the score ignores the feature) is zero.
    Wrapped in ``stop_gradient``.
  """
  params = jax.lax.stop_gradient(params)

  def neg_margin(fp, fn):  # sum_b -(x_ui - x_uj): per row, the direction of d L_bpr / d f.
    return -jnp.sum(recommender.difference(params, users, pos, neg, fp, fn))

  g_pos, g_neg = jax.grad(neg_margin, argnums=(0, 1))(pos_features, neg_features)
  return (jax.lax.stop_gradient(eps * _unit_rows(g_pos)),
          jax.lax.stop_gradient(eps * _unit_rows(g_neg)))


@dataclasses.dataclass(frozen=True)
class AdversarialTerm:
  """AMR's stage term (:data:`jaxvars.recommenders.LossTerms`): ``{'adversarial':
  weight * L_bpr(f + delta)}`` (float32 scalar, the mean over the batch), with delta from
  :func:`fgm_perturbation` at ``eps``.

  Attributes:
    eps: L2 norm of the perturbation per item row (``config.recommender.adv_eps``).
    weight: lambda, the weight of the adversarial BPR term (``config.recommender.adv_weight``).
  """
  eps: float
  weight: float

  def __call__(self, recommender: Recommender, params, batch, features) -> dict:
    """Args: batch {'user', 'pos', 'neg'} int32 [B] and {'pos_features', 'neg_features'}
    float32 [B, F] (f_i, f_j as the BPR term scored them); features: the training source
    (unused)."""
    u, i, j = batch["user"], batch["pos"], batch["neg"]
    f_i, f_j = batch["pos_features"], batch["neg_features"]
    d_i, d_j = fgm_perturbation(recommender, params, u, i, j, f_i, f_j, eps=self.eps)
    x_adv = recommender.difference(params, u, i, j, f_i + d_i, f_j + d_j)
    return {"adversarial": self.weight * losses.bpr(pos_scores=x_adv,
                                                    neg_scores=jnp.zeros_like(x_adv))}


def with_adversarial_stage(base: Recommender, rec_config, *, name: str, label: str,
                           bpr_epochs: int) -> Recommender:
  """``base`` renamed and given AMR's stages: 'bpr' for ``bpr_epochs``, then 'adversarial'
  for ``adv_epochs`` with :class:`AdversarialTerm` (``adv_eps``, ``adv_weight``)."""
  term = AdversarialTerm(eps=float(rec_config.adv_eps), weight=float(rec_config.adv_weight))
  return dataclasses.replace(base, name=name, label=label, stages=(
      TrainingStage(BPR_STAGE, int(bpr_epochs)),
      TrainingStage(ADVERSARIAL_STAGE, int(rec_config.adv_epochs), term)))


def build(rec_config, *, num_users: int, num_items: int, feature_dim: int) -> Recommender:
  """AMR: :func:`jaxvars.recommenders.vbpr.build`'s VBPR with AMR's name, label and stages
  ('bpr' for ``epochs``, then 'adversarial' for ``adv_epochs`` with :class:`AdversarialTerm`)."""
  base = vbpr.build(rec_config, num_users=num_users, num_items=num_items,
                    feature_dim=feature_dim)
  return with_adversarial_stage(base, rec_config, name="amr", label="AMR",
                                bpr_epochs=rec_config.epochs)


def build_on_dvbpr(rec_config, *, num_users: int, num_items: int,
                   feature_dim: int) -> Recommender:
  """AMR on DVBPR ('amr_dvbpr', the paper's Tables 2-3 DVBPR block): :mod:`jaxvars.
  recommenders.dvbpr`'s DVBPR trained for ``dvbpr_epochs`` of BPR, then ``adv_epochs``
  with :class:`AdversarialTerm` on its CNN's item embeddings Phi(X_i) (Tang et al.'s
  perturbation of the visual feature; the gradient then trains the CNN too)."""
  base = dvbpr.build(rec_config, num_users=num_users, num_items=num_items,
                     feature_dim=feature_dim)
  return with_adversarial_stage(base, rec_config, name="amr_dvbpr", label="AMR (DVBPR)",
                                bpr_epochs=rec_config.dvbpr_epochs)


def _validate_own(rec_config) -> None:
  for field in OWN_FIELDS:
    if field not in rec_config:
      raise ConfigError(f"config.recommender.{field} is missing (AMR reads it; "
                        "configs/joint.py defines it)")
  value = rec_config.adv_epochs
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"config.recommender.adv_epochs={value!r} must be an integer >= 0")
  for field in ("adv_eps", "adv_weight"):
    value = rec_config[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
        or value == float("inf"):
      raise ConfigError(f"config.recommender.{field}={value!r} must be a finite number >= 0")


def validate_on_dvbpr(rec_config) -> None:
  """:func:`validate` for 'amr_dvbpr': DVBPR's fields, then AMR's own."""
  dvbpr.validate(rec_config)
  _validate_own(rec_config)


def validate(rec_config) -> None:
  """Raises ConfigError naming the first bad field of ``config.recommender``: VBPR's
  (:func:`jaxvars.recommenders.vbpr.validate`), then adv_epochs (an integer >= 0), adv_eps
  and adv_weight (numbers >= 0)."""
  vbpr.validate(rec_config)
  _validate_own(rec_config)


RECOMMENDERS.register("amr", RecommenderEntry(build=build, validate=validate,
                                              own_fields=OWN_FIELDS))
RECOMMENDERS.register("amr_dvbpr", RecommenderEntry(
    build=build_on_dvbpr, validate=validate_on_dvbpr,
    own_fields=OWN_FIELDS + dvbpr.OWN_FIELDS))
