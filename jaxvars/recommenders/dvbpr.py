"""DVBPR: Deep Visually-aware BPR (Kang, Fang, Wang & McAuley, "Visually-Aware Fashion
Recommendation and Design with Generative Image Models", ICDM 2017; the authors' code:
github.com/kang205/DVBPR, ``DVBPR/main.py``).

The preference score is the user's factor dotted with a CNN's embedding of the item photo,
the CNN trained end to end with BPR from random weights (no pretrained backbone):

  x_ui = theta_u . Phi(X_i)                        (Kang et al. eq. 3; AIP eq. 5)

(Kang et al.'s global and user biases cancel in BPR and are omitted.) The item features
are therefore not a frozen table: the recommender reads the photos itself
(``feature_source = FEATURES_FROM_IMAGES``). Training feeds it the photos of each triplet
(:meth:`jaxvars.recommenders.Recommender.batch_features`); attacks, defences and
evaluation go through its trained CNN (:func:`jaxvars.experiment.recommender_consts`,
:meth:`jaxvars.models.Models.features`), so an attack on DVBPR is white-box through
Phi, and OURS in front of it is D, then Phi.

Phi is Kang et al.'s CNN-F layout (their ``CNN``): conv 11x11/4 + max-pool 2, conv 5x5 +
max-pool 2, three conv 3x3, max-pool 2, flatten, two fully connected ReLU layers, and a
linear layer to K; ReLU after every conv; 'SAME' padding. Photos are resized (bilinear,
antialiased: differentiable, so an attack on the full-size photo goes through it) to
``dvbpr_input_size`` and scaled to [-1, 1] as theirs ((x - 127.5) / 127.5). At the paper's
size (``configs/joint.py`` without a size preset): 224 px, widths (64, 256, 256, 256, 256),
4096-wide fully connected layers, K = ``factors``. At the CPU sizes the same layout runs
narrower and on smaller photos (the presets set ``dvbpr_channels``, ``dvbpr_hidden``,
``dvbpr_input_size``; docs/running.md gives the cost). It is trained from random weights,
as Kang et al. train theirs: initialising it from the frozen backbone would not fit, since
EfficientNet-Lite's early stages are not CNN-F's layers.

Loss (Kang et al.'s ``cost_train``, as a batch mean instead of a sum): ``-log sigmoid(x_ui
- x_uj) + dvbpr_reg_user * mean_b ||theta_u||^2 + dvbpr_reg_cnn * sum ||W||^2`` over the
CNN's weight matrices (not its biases). Their lambda2 = 1 on ``l2_loss`` (half the squared
norm) of the batch's user rows summed over the batch is 0.5 per triplet here; their
lambda1 = 0.001 on half the weights' squared norm, once per batch of 128, is 0.001 / 2 /
128 = 3.9e-6 per triplet. Their optimiser is Adam at 1e-4 for 20 epochs, batch 128; here
the recommender's optimiser, ``lr`` and ``batch_size`` with ``dvbpr_epochs`` epochs.
Differences on purpose: no dropout (their fully connected layers keep 0.5 of the units in
training; training here is deterministic), and theta_u is initialised like VBPR's factors
(normal, ``init_scale``) instead of uniform [0, 0.01].
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvars.errors import ConfigError
from jaxvars.recommenders.base import (BPR_STAGE, FEATURES_FROM_IMAGES, RECOMMENDERS,
                                       Recommender, RecommenderEntry, TrainingStage)

# config.recommender fields only DVBPR (and AMR on it) reads.
OWN_FIELDS = ("dvbpr_epochs", "dvbpr_input_size", "dvbpr_channels", "dvbpr_hidden",
              "dvbpr_reg_user", "dvbpr_reg_cnn")
# CNN-F's layers (Kang et al.'s weights 'wc1'..'wc5'): (kernel, stride, max-pool after).
CNN_F_CONVS = ((11, 4, True), (5, 1, True), (3, 1, False), (3, 1, False), (3, 1, True))


class CNNF(nn.Module):
  """Kang et al.'s CNN-F item embedding Phi (widths configurable).

  Attributes:
    channels: the five conv layers' widths (paper size: (64, 256, 256, 256, 256)).
    hidden: width of the two fully connected ReLU layers (paper size: 4096).
    out: K, the embedding size.
    input_size: the side photos are resized to before the first conv.

  ``__call__(images float32 [B, H, W, 3] in [0, 1]) -> float32 [B, out]``.
  """
  channels: tuple[int, ...]
  hidden: int
  out: int
  input_size: int

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    x = images
    if (h, w) != (self.input_size, self.input_size):
      x = jax.image.resize(x, (b, self.input_size, self.input_size, c), "linear",
                           antialias=True)
    x = (x * 255.0 - 127.5) / 127.5
    init = nn.initializers.xavier_uniform()
    for width, (kernel, stride, pool) in zip(self.channels, CNN_F_CONVS):
      x = nn.relu(nn.Conv(width, (kernel, kernel), strides=(stride, stride), padding="SAME",
                          kernel_init=init)(x))
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((b, -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(self.hidden, kernel_init=init)(x))
    return nn.Dense(self.out, kernel_init=init)(x)


class DVBPR(nn.Module):
  """DVBPR scorer with its CNN.

  Attributes:
    num_users: U. factors: K (theta_u and Phi's output). channels, hidden, input_size:
      :class:`CNNF`'s. init_scale: std of theta_u's normal initialisation.

  ``__call__(users int [...], items int [...], features float32 [..., K]) -> float32
  [...]``: theta_u . f with ``features`` the items' embeddings Phi(X_i) (``items`` is
  unused: no item parameter but the photo's). ``encode(images)`` gives Phi.
  """
  num_users: int
  factors: int
  channels: tuple[int, ...]
  hidden: int
  input_size: int
  init_scale: float = 0.01

  def setup(self):
    self.user_factors = self.param("user_factors", nn.initializers.normal(self.init_scale),
                                   (self.num_users, self.factors))
    self.cnn = CNNF(channels=tuple(self.channels), hidden=self.hidden, out=self.factors,
                    input_size=self.input_size)

  def encode(self, images):
    """Phi(X) [B, K] of float32 photos [B, H, W, 3] in [0, 1]."""
    return self.cnn(images)

  def initialize(self, users, items, images):
    """Scores of ``users``' for the photos ``images`` (creates every parameter)."""
    return self(users, items, self.encode(images))

  def __call__(self, users, items, features):
    del items  # DVBPR has no item parameter: the photo is the item.
    return jnp.sum(self.user_factors[users] * features, axis=-1)

  def l2_terms(self, users, pos_items, neg_items):
    """(users, cnn): mean over the batch of ||theta_u||^2, and the sum of the squared CNN
    weight matrices (kernels, not biases), float32 scalars."""
    del pos_items, neg_items
    users_sq = jnp.mean(jnp.sum(jnp.square(self.user_factors[users]), axis=-1))
    kernels = [v for path, v in jax.tree_util.tree_leaves_with_path(
        self.variables["params"]["cnn"]) if getattr(path[-1], "key", None) == "kernel"]
    return users_sq, sum(jnp.sum(jnp.square(k)) for k in kernels)


def module(rec_config, *, num_users: int) -> DVBPR:
  """The :class:`DVBPR` module of ``config.recommender``."""
  return DVBPR(num_users=num_users, factors=int(rec_config.factors),
               channels=tuple(int(c) for c in rec_config.dvbpr_channels),
               hidden=int(rec_config.dvbpr_hidden),
               input_size=int(rec_config.dvbpr_input_size),
               init_scale=float(rec_config.init_scale))


def build(rec_config, *, num_users: int, num_items: int, feature_dim: int) -> Recommender:
  """DVBPR from ``config.recommender`` (factors, init_scale and the ``dvbpr_*`` fields);
  ``feature_dim`` (the frozen backbone's) is unused: its features are its CNN's."""
  del num_items, feature_dim
  return Recommender(name="dvbpr", label="DVBPR", module=module(rec_config, num_users=num_users),
                     penalty_weights=(float(rec_config.dvbpr_reg_user),
                                      float(rec_config.dvbpr_reg_cnn)),
                     feature_source=FEATURES_FROM_IMAGES,
                     stages=(TrainingStage(BPR_STAGE, int(rec_config.dvbpr_epochs)),))


def validate(rec_config) -> None:
  """Raises ConfigError naming the first bad DVBPR field of ``config.recommender``."""
  for field in OWN_FIELDS + ("factors",):
    if field not in rec_config:
      raise ConfigError(f"config.recommender.{field} is missing (DVBPR reads it; "
                        "configs/joint.py defines it)")
  for field in ("factors", "dvbpr_input_size", "dvbpr_hidden"):
    value = rec_config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.recommender.{field}={value!r} must be a positive integer")
  value = rec_config.dvbpr_epochs
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"config.recommender.dvbpr_epochs={value!r} must be an integer >= 0")
  chans = rec_config.dvbpr_channels
  if (not isinstance(chans, (tuple, list)) or len(chans) != len(CNN_F_CONVS)
      or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chans)):
    raise ConfigError(f"config.recommender.dvbpr_channels={chans!r} must be {len(CNN_F_CONVS)} "
                      "positive integers (CNN-F's five conv widths)")
  for field in ("dvbpr_reg_user", "dvbpr_reg_cnn", "init_scale"):
    value = rec_config[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
        or value == float("inf"):
      raise ConfigError(f"config.recommender.{field}={value!r} must be a finite number >= 0")


RECOMMENDERS.register("dvbpr", RecommenderEntry(build=build, validate=validate,
                                                own_fields=OWN_FIELDS))
