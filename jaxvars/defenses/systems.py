"""Defended systems: named pipelines from a catalogue photo to what the backbone sees.

A system is a transform ``(models, params, images, keys) -> images`` in front of the
frozen backbone and the recommender. Evaluation ranks the catalogue as each system of
``config.systems.evaluate`` sees it, under every condition; the report labels its rows
with ``System.label``. A new defence is one module of :mod:`jaxvars.defenses` that
registers a :class:`System` here (and names it in ``config.systems.evaluate``).

Registered here: ``undefended`` (the plain recommender; its rows are named after the
recommender, e.g. ``vbpr/clean``), ``defended`` (OURS: D(x), paper 3.3) and
``defended_rand`` (OURS-rand: D(rand(x)), with one random resize + pad per item).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxvars.registry import Registry

SYSTEMS = Registry("defended system")
UNDEFENDED = "undefended"

Transform = Callable[..., jax.Array]  # (models, params, images [B,H,W,3], keys [B] | None)


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
  """
  label: str | None
  make: Callable[..., Transform]
  needs: tuple[str, ...] = ()
  randomized: bool = False
  description: str = ""
  settings: Callable[..., dict] = lambda config: {}
  validate: Callable[..., None] = lambda config: None


def row_name(system: str, recommender_name: str) -> str:
  """The name of a system's rows in results.json (the recommender's for ``undefended``)."""
  return recommender_name if system == UNDEFENDED else system


def _undefended(models, params, images, keys):
  return images


def _defended(models, params, images, keys):
  return models.denoise(params, images)


def _defended_rand(models, params, images, keys):
  return jax.vmap(lambda img, k: models.denoise(params, img[None], rand_key=k)[0])(images, keys)


SYSTEMS.register(UNDEFENDED, System(label=None, make=lambda config: _undefended,
                                    description="the recommender on the photos as uploaded"))
SYSTEMS.register("defended", System(label="OURS", make=lambda config: _defended,
                                    needs=("denoiser",),
                                    description="denoiser D in front of the frozen backbone"))
SYSTEMS.register("defended_rand", System(
    label="OURS-rand", make=lambda config: _defended_rand, needs=("denoiser",), randomized=True,
    description="random resize + pad (one draw per item), then D"))
