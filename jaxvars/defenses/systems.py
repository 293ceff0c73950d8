"""Defended systems: named pipelines from a catalogue photo to what the backbone sees.

A system is a transform ``(models, params, images, keys) -> images`` in front of the
frozen backbone and the recommender. Evaluation ranks the catalogue as each system of
``config.systems.evaluate`` sees it, under every condition; the report labels its rows
with ``System.label``. A new defence is one module of :mod:`jaxvars.defenses` that
registers a :class:`System` here (and names it in ``config.systems.evaluate``).

Registered here: ``undefended`` (the plain recommender; its rows are named after the
recommender, e.g. ``vbpr/clean``), ``defended`` (OURS: D(x), paper 3.3),
``defended_rand`` (OURS-rand: rand(D(x)) as the paper, or D(rand(x)) with
``config.denoiser.rand_order='before'``; padding ``config.denoiser.rand_pad``) and
``defended_rand_border`` (the same with border-colour padding) and ``defended_gated``
(OURS-gated: D only on the photos the detector flags, the others as uploaded).

A transform is ``(models, params, images, keys, consts=None) -> images``: float32 images
[B, H, W, 3] in [0, 1]; ``consts`` the frozen backbone's constants, with the deployed
detector threshold under :data:`GATE_THRESHOLD` where the evaluation has calibrated one. A
randomised system's transform takes keys [K, B] (K draws of each of B photos) and returns
[K, B, H, W, 3]; the others take ``keys=None`` and return [B, H, W, 3].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxvars.defenses.detector import detection_score
from jaxvars.registry import Registry

SYSTEMS = Registry("defended system")
UNDEFENDED = "undefended"
# consts key of the deployed detector threshold (set by the evaluation from the clean
# calibration items' scores at config.detector.fpr), read by the gated system.
GATE_THRESHOLD = "detector_threshold"

Transform = Callable[..., jax.Array]  # (models, params, images [B,H,W,3], keys | None, consts)


@dataclasses.dataclass(frozen=True)
class System:
  """One registered pipeline.

  Attributes:
    label: the name in tables ('OURS-rand'); None = the recommender's label.
    make: ``config -> Transform``: binds the system's settings (e.g. a JPEG quality).
    needs: parameter groups a defence stage must have trained (else it is not evaluated).
    randomized: draws randomness per item (its transform gets one PRNG key per image).
    description: one line for the report: what the backbone sees.
    settings: ``config -> dict`` of the settings it runs with (recorded in results.json).
    validate: ``config -> None``, raising ConfigError for a bad setting of its own.
    gated: reads the deployed detector threshold (``consts[GATE_THRESHOLD]``).
    host_callback: runs host (Python) code inside the jitted program (``jax.pure_callback``).
      Such programs run one batch at a time (``features.batched_map``): two at once on a
      CPU can park both callbacks on XLA's thread pool, each waiting for the pool, and hang
      (seen on H&M with JPEG's codec, 2 cores).
  """
  label: str | None
  make: Callable[..., Transform]
  needs: tuple[str, ...] = ()
  randomized: bool = False
  description: str = ""
  settings: Callable[..., dict] = lambda config: {}
  validate: Callable[..., None] = lambda config: None
  gated: bool = False
  host_callback: bool = False


def draw_keys(items: jax.Array, base: jax.Array, *, draws: int) -> jax.Array:
  """PRNG keys [draws, B] of a randomised system's transform of ``items`` [B]: draw d of
  item i is ``fold_in(fold_in(base, i), d)``, whatever the batch it is in."""
  per_item = jax.vmap(lambda i: jax.random.fold_in(base, i))(items)
  return jax.vmap(lambda d: jax.vmap(lambda k: jax.random.fold_in(k, d))(per_item))(
      jnp.arange(draws))


def row_name(system: str, recommender_name: str) -> str:
  """The name of a system's rows in results.json (the recommender's for ``undefended``)."""
  return recommender_name if system == UNDEFENDED else system


def _undefended(models, params, images, keys, consts=None):
  return images


def _defended(models, params, images, keys, consts=None):
  return models.denoise(params, images)


def gated_denoise(models, params, consts, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """OURS-gated: D(x) where the detector flags x (score ||z(x) - z(D(x))|| above the deployed
  threshold), x itself elsewhere.

  Args:
    models, params: the composed models and their parameters (denoiser, detector).
    consts: the backbone's constants with the threshold under :data:`GATE_THRESHOLD`.
    images: float32 [B, H, W, 3] in [0, 1].

  Returns:
    (images float32 [B, H, W, 3], flagged bool [B]). The gate itself has no gradient: a
    white-box attacker differentiates through the branch each photo takes (and evades the
    gate with the detector-aware penalty, :mod:`jaxvars.attacks.whitebox`).

  Raises:
    ValueError: ``consts`` without a threshold (only an evaluation that calibrated the
      detector can run this system).
  """
  if consts is None or GATE_THRESHOLD not in consts:
    raise ValueError(f"the gated system needs the deployed detector threshold in "
                     f"consts[{GATE_THRESHOLD!r}] (set by the evaluation from the calibration "
                     f"items)")
  denoised = models.denoise(params, images)
  z = models.embed(params, consts, jnp.concatenate([images, denoised]))
  b = images.shape[0]
  flagged = detection_score(z[:b], z[b:]) > consts[GATE_THRESHOLD]
  return jnp.where(flagged[:, None, None, None], denoised, images), flagged


def _gated(models, params, images, keys, consts=None):
  return gated_denoise(models, params, consts, images)[0]


def make_rand_system(config, *, pad: str | None = None) -> Transform:
  """The transform of OURS-rand: rand(D(x)) or D(rand(x)) (``config.denoiser.rand_order``),
  K draws per photo, padding ``pad`` (default ``config.denoiser.rand_pad``)."""
  order = config.denoiser.get("rand_order", "after")
  pad = pad or config.denoiser.rand_pad

  def transform(models, params, images, keys, consts=None):
    if order == "after":  # D once, then K random resize + pads of its output.
      denoised = models.denoise(params, images)
      return jax.vmap(lambda ks: models.rand(denoised, ks, pad=pad))(keys)
    return jax.vmap(lambda ks: models.denoise(params, models.rand(images, ks, pad=pad)))(keys)

  return transform


SYSTEMS.register(UNDEFENDED, System(label=None, make=lambda config: _undefended,
                                    description="the recommender on the photos as uploaded"))
SYSTEMS.register("defended", System(label="OURS", make=lambda config: _defended,
                                    needs=("denoiser",),
                                    description="denoiser D in front of the frozen backbone"))
SYSTEMS.register("defended_rand", System(
    label="OURS-rand", make=make_rand_system, needs=("denoiser",), randomized=True,
    description="D and a random resize + pad (Xie et al. 2018), in config.denoiser.rand_order",
    settings=lambda config: {"rand_order": config.denoiser.get("rand_order", "after"),
                             "rand_pad": config.denoiser.rand_pad,
                             "rand_min_scale": config.denoiser.rand_min_scale}))
SYSTEMS.register("defended_rand_border", System(
    label="OURS-rand-border", make=lambda config: make_rand_system(config, pad="border"),
    needs=("denoiser",), randomized=True,
    description="OURS-rand padding with the photo's border colour instead of black",
    settings=lambda config: {"rand_order": config.denoiser.get("rand_order", "after"),
                             "rand_pad": "border",
                             "rand_min_scale": config.denoiser.rand_min_scale}))
SYSTEMS.register("defended_gated", System(
    label="OURS-gated", make=lambda config: _gated, needs=("denoiser", "detector"),
    gated=True,
    description="D only on the photos the detector flags at the deployed threshold (the others "
                "as uploaded), so clean photos mostly reach the backbone unchanged",
    settings=lambda config: {"detector_fpr": float(config.detector.fpr)}))
