"""Detection baselines: detectors of attacked photos that need no training, scored beside the
contrastive detector (paper 3.4) on the same held-out photos, with the threshold set the same
way (the (1 - ``config.detector.fpr``) quantile of the clean calibration photos' scores) and
the same metrics and 95% intervals (:class:`jaxvars.evaluation.checks.Detection`; the paper's
Table 4 compares its detector with ADDITION the same way).

A baseline is one module of :mod:`jaxvars.defenses` that registers a :class:`Baseline` in
:data:`DETECTION_BASELINES`; ``config.detector.baselines`` names those scored. Registered:
``feature_squeezing`` (Xu et al. 2018, :mod:`jaxvars.defenses.feature_squeezing`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxvars.registry import Registry

DETECTION_BASELINES = Registry("detection baseline")

# (models, params, consts, images float32 [B, H, W, 3] in [0, 1]) -> scores float32 [B].
ScoreFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One registered detection baseline.

  Attributes:
    label: its name in tables ('Feature squeezing').
    make: ``config -> ScoreFn``, binding its settings; the function is pure and jittable
      (``models`` closed over, the rest arguments), higher score = more likely attacked.
    settings: ``config -> dict`` of the settings it runs with (recorded in results.json).
    validate: ``config -> None``, raising ConfigError for a bad setting of its own.
    needs_visual: it reads the recommender's visual embedding, so a recommender that uses no
      item photos (BPR-MF) has nothing to score it with: it is skipped there.
    host_callback: its program runs host code (``jax.pure_callback``: JPEG's codec), so its
      batches run one at a time (see :class:`jaxvars.defenses.systems.System`).
    description: one line for the report: what the score measures.
  """
  label: str
  make: Callable[..., ScoreFn]
  settings: Callable[..., dict] = lambda config: {}
  validate: Callable[..., None] = lambda config: None
  needs_visual: bool = False
  host_callback: bool = False
  description: str = ""
