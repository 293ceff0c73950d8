"""The recommender interface and registry.

A recommender scores (user, item) pairs from learned factors and, for visually-aware ones,
the item's visual feature f_i. Training (BPR), the attacks and evaluation talk to it only
through :class:`Recommender`, so a new model (BPR-MF without a visual term, AMR, DVBPR
whose item features come from a trainable CNN) is one file that registers a builder in
``RECOMMENDERS``.

A recommender owns its training loss: BPR + its weighted L2 terms (``penalty_terms``) +,
in each of its training stages (:class:`TrainingStage`), the stage's own loss terms
(:data:`LossTerms`, e.g. AMR's adversarial regulariser in its second stage). Training
(:mod:`jaxvars.training.recommender`) runs the stages in order. A recommender without
training (AlexRank: closed-form user profiles) instead has a ``fit_fn``
(:meth:`Recommender.fit`), which training calls once in place of the stages.
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

# The terms a training stage adds to BPR: ``terms(recommender, params, batch, features) ->
# {name: float32 scalar}``, with ``batch`` = {'user', 'pos', 'neg'}: int32 [B] triplets
# (u, i, j), and 'pos_features', 'neg_features': float32 [B, F], f_i and f_j as the BPR
# term scored them (:meth:`Recommender.batch_features`: table rows, or the recommender's
# own embedding of the photos, differentiable in ``params``), and ``features`` the training
# source (the feature table float32 [I, F], or the uint8 photos of a recommender that reads
# them). Every
# value is already weighted: it is added to the loss as it is, and reported under its name
# in the per-step and per-epoch metrics (so no name may be 'loss', 'bpr' or
# 'pairwise_accuracy'). A callable with value equality (a frozen dataclass), so that two
# builds of one config give equal recommenders.
LossTerms = Callable[..., dict]
BPR_STAGE = "bpr"  # The name of the plain BPR stage (every recommender's first, by default).
RESERVED_METRICS = ("loss", "bpr", "pairwise_accuracy")  # What bpr_objective reports itself.


@dataclasses.dataclass(frozen=True)
class TrainingStage:
  """One stage of a recommender's training: ``epochs`` epochs of BPR + the recommender's L2
  terms + ``terms`` (None: none).

  Attributes:
    name: the stage's name (history rows, progress bar, log lines), e.g. 'bpr',
      'adversarial'.
    epochs: its number of epochs (int >= 0; 0 skips it).
    terms: :data:`LossTerms` of the stage, or None.
  """
  name: str
  epochs: int
  terms: LossTerms | None = None


# Where a recommender's item features come from.
FEATURES_FROM_TABLE = "table"  # A frozen backbone's features, computed once per image set.
FEATURES_FROM_IMAGES = "images"  # A trainable CNN over the item photos (DVBPR): not a table.
# The key of ``consts`` under which a recommender that reads photos (FEATURES_FROM_IMAGES)
# finds its own trained parameters at evaluation (:func:`jaxvars.experiment.
# recommender_consts`), so that ``Models.features(consts, images)`` goes through its CNN.
ENCODER_CONSTS = "recommender_encoder"


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
    feature_source: FEATURES_FROM_TABLE (the frozen backbone's normalised table) or
      FEATURES_FROM_IMAGES: the recommender embeds the photos itself, with a trainable
      network in its own parameters (DVBPR). Its module then also has ``encode(images
      float32 [B, H, W, 3] in [0, 1]) -> features float32 [B, F']`` and ``initialize(users,
      items, images)`` (runs both, for :meth:`init`), and an ``input_size`` attribute (the
      side of the photos :meth:`init` traces it with). Training feeds it photos instead of
      table rows (:meth:`batch_features`); evaluation, attacks and defences read its
      features through :meth:`encode` (``jaxvars.models.Models.features``).
    stages: its training stages, in order (:class:`TrainingStage`); empty (the default):
      one 'bpr' stage of ``config.recommender.epochs`` epochs with no terms of its own
      (VBPR, BPR-MF). See :meth:`training_stages`.
    fit_fn: None (the default: the recommender is trained, through its stages), or for a
      recommender that is fitted in closed form instead of trained (AlexRank)
      ``fit_fn(params, train_users int32 [N], train_items int32 [N], features float32
      [I, F]) -> params`` (the same structure, shapes and dtypes as ``params``; ``features``
      the clean normalised table ``consts['features']``). Such a recommender has no stages
      and no optimiser; see :meth:`fit`.
  """
  name: str
  label: str
  module: nn.Module
  penalty_weights: tuple[float, ...]
  uses_features: bool = True
  feature_source: str = FEATURES_FROM_TABLE
  stages: tuple[TrainingStage, ...] = ()
  fit_fn: Callable | None = None

  @property
  def fitted(self) -> bool:
    """True for a recommender fitted in closed form (``fit_fn``), not trained."""
    return self.fit_fn is not None

  def training_stages(self, epochs: int) -> tuple[TrainingStage, ...]:
    """The stages training runs, in order: none for a fitted recommender (:meth:`fit`),
    else ``stages``, or where that is empty one 'bpr' stage of ``epochs``
    (``config.recommender.epochs``) epochs. Their epochs add up to the recommender's
    epochs; the learning-rate drop stays defined on the first ``config.recommender.epochs``
    (:func:`jaxvars.training.recommender.make_optimizer`)."""
    if self.fitted:
      return ()
    return self.stages or (TrainingStage(BPR_STAGE, int(epochs)),)

  def fit(self, params, train_users, train_items, features) -> dict:
    """The parameters of a fitted recommender (``fit_fn``) on the training pairs.

    Args:
      params: its parameters (e.g. :meth:`init`'s): their structure, shapes and dtypes.
      train_users, train_items: int32 [N], the training pairs (u, i).
      features: float32 [I, F], the item feature table (normalised).

    Returns:
      The fitted parameters, of ``params``' structure, shapes and dtypes.

    Raises:
      TypeError: a recommender that is trained, not fitted (``fit_fn`` is None).
      ValueError: ``fit_fn`` returned parameters of another structure, shape or dtype.
    """
    if self.fit_fn is None:
      raise TypeError(f"recommender {self.name!r} is trained (its stages: "
                      "jaxvars.training.recommender), not fitted: it has no fit_fn")
    fitted = self.fit_fn(params, train_users, train_items, features)
    spec = lambda tree: (jax.tree.structure(tree), [(jnp.shape(a), jnp.result_type(a))
                                                     for a in jax.tree.leaves(tree)])
    if spec(fitted) != spec(params):
      raise ValueError(f"recommender {self.name!r}: fit_fn returned parameters "
                       f"{jax.tree.map(jnp.shape, fitted)}, not of the structure, shapes and "
                       f"dtypes of {jax.tree.map(jnp.shape, params)}")
    return fitted

  @property
  def reads_images(self) -> bool:
    """True for a recommender that embeds the photos with its own network
    (``feature_source == FEATURES_FROM_IMAGES``: DVBPR)."""
    return self.feature_source == FEATURES_FROM_IMAGES

  def init(self, key: jax.Array, feature_dim: int) -> dict:
    """Initial parameters (a pytree) for item features of size ``feature_dim`` (the frozen
    backbone's; a recommender that reads photos ignores it and initialises its own network
    on photos of side ``module.input_size``)."""
    index = jnp.zeros((1,), jnp.int32)
    if self.reads_images:
      s = int(self.module.input_size)
      return self.module.init(key, index, index, jnp.zeros((1, s, s, 3)),
                              method="initialize")["params"]
    return self.module.init(key, index, index, jnp.zeros((1, feature_dim)))["params"]

  def encode(self, params, images: jax.Array) -> jax.Array:
    """Item features float32 [B, F'] of float32 photos [B, H, W, 3] in [0, 1], through the
    recommender's own network (FEATURES_FROM_IMAGES).

    Raises:
      TypeError: a recommender that reads the frozen backbone's table.
    """
    if not self.reads_images:
      raise TypeError(f"recommender {self.name!r} reads the frozen backbone's feature table "
                      "(feature_source='table'); it has no network of its own to encode photos")
    return self.module.apply({"params": params}, images, method="encode")

  def batch_features(self, params, source: jax.Array, items: jax.Array) -> jax.Array:
    """The features float32 [B, F] of ``items`` (int32 [B]) in training: rows of the table
    ``source`` (float32 [I, F], FEATURES_FROM_TABLE) or, for a recommender that reads
    photos, :meth:`encode` of the photos ``source[items]`` (``source``: the catalogue's
    uint8 photos [I, H, W, 3], pixels 0..255), differentiable in ``params``."""
    if self.reads_images:
      return self.encode(params, source[items].astype(jnp.float32) / 255.0)
    return source[items]

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
  ``validate(rec_config)`` (raises ConfigError naming a bad field of its own).

  ``own_fields``: the ``config.recommender`` fields that only this recommender reads (AMR:
  'adv_epochs', 'adv_eps', 'adv_weight'). They shape its checkpoints' records
  (:func:`jaxvars.training.records.stage_fields`) and nobody else's: a run of another
  recommender leaves them out, so adding a recommender with fields of its own keeps the
  records of existing workdirs valid."""
  build: Callable[..., Recommender]
  validate: Callable[..., None] = lambda rec_config: None
  own_fields: tuple[str, ...] = ()


def unread_fields(name: str) -> frozenset[str]:
  """The ``config.recommender`` fields that recommender ``name`` does not read: the
  ``own_fields`` of every other registered recommender, less its own."""
  entry = RECOMMENDERS.get(name) if name in RECOMMENDERS else None  # Unknown: validation says.
  others = {f for n, e in RECOMMENDERS.items() if n != name for f in e.own_fields}
  return frozenset(others - set(entry.own_fields if entry is not None else ()))
