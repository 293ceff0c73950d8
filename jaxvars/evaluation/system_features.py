"""Item features of a catalogue as every registered defended system sees it, in one pass."""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from jaxvars import distributed, rng, sharding
from jaxvars.defenses import SYSTEMS
from jaxvars.defenses import systems as systems_lib
from jaxvars.features import batched_map, concurrent_batches
from jaxvars.pixels import to_float


def draw_keys(items: jax.Array, *, seed: int, draws: int) -> jax.Array:
  """PRNG keys [draws, B] of a randomised system's transform of ``items`` [B] in evaluation:
  draw d of item i is ``fold_in(fold_in(stream(seed, 'defense/rand'), i), d)``."""
  return systems_lib.draw_keys(items, rng.stream(seed, rng.RAND_TRANSFORM), draws=draws)


def systems_features(system_names, *, models, params, consts, images: np.ndarray, mesh,
                     batch_size: int, config, seed: int, draws: int = 1,
                     items: np.ndarray | None = None) -> dict:
  """Normalised features of a catalogue (uint8 [I, S, S, 3]) through registered systems.

  ``items`` [I] are the photos' item indices (their random draws depend on them); default
  0..I-1.

  All systems run in one jitted pass per batch, so what they share (the denoiser's output
  D(x), for OURS and OURS-rand) is computed once (XLA merges the identical computations).

  Returns:
    {system: float32 [I, F]}; [draws, I, F] for a randomised system (draw d of every item
    from :func:`draw_keys`).
  """
  systems = {name: SYSTEMS.get(name) for name in system_names}
  frozen = ml_collections.FrozenConfigDict(config)
  params, consts = distributed.put((params, consts), sharding.replicated(mesh))

  items = np.arange(len(images), dtype=np.int32) if items is None else np.asarray(items,
                                                                                 np.int32)
  # Systems with host callbacks (JPEG's codec) must not run two batches at once (see
  # System.host_callback): where batched_map would, they get a pass of their own, one batch
  # at a time, and the others keep the concurrent one (they share nothing with them).
  groups = [tuple(system_names)]
  if concurrent_batches(mesh) > 1 and any(systems[n].host_callback for n in system_names):
    groups = [tuple(n for n in system_names if not systems[n].host_callback),
              tuple(n for n in system_names if systems[n].host_callback)]
  out = {}
  for group in (g for g in groups if g):
    serial = any(systems[n].host_callback for n in group)

    def fn(batch, group=group):
      return _systems_pass(params, consts, batch, names=group, models=models,
                           config=frozen, seed=int(seed), draws=int(draws))

    out.update(batched_map(fn, {"images": images, "items": items}, batch_size=batch_size,
                           mesh=mesh, desc=f"{'/'.join(group)} features",
                           workers=1 if serial else None))
  return {name: np.transpose(out[name], (1, 0, 2)) if systems[name].randomized else out[name]
          for name in system_names}


@functools.partial(jax.jit, static_argnames=("names", "models", "config", "seed", "draws"))
def _systems_pass(params, consts, batch, *, names, models, config, seed, draws):
  """One batch through every system of ``names``. The weights are arguments and the rest
  static, so one run compiles this once per (systems, shapes), however many catalogues
  (attacks, targets) it scores."""
  x = to_float(batch["images"])
  out = {}
  for name in names:
    system = SYSTEMS.get(name)
    transform = system.make(config)
    if not system.randomized:
      out[name] = models.features(consts, transform(models, params, x, None, consts))
      continue
    seen = transform(models, params, x, draw_keys(batch["items"], seed=seed, draws=draws),
                     consts)
    k, b = seen.shape[:2]
    feats = models.features(consts, seen.reshape((k * b,) + seen.shape[2:]))
    out[name] = feats.reshape(k, b, -1).transpose(1, 0, 2)  # [B, K, F]: batch first.
  return out


def system_features(system_name: str, **kwargs) -> np.ndarray:
  """The features of one system (see :func:`systems_features`)."""
  return systems_features((system_name,), **kwargs)[system_name]
