"""Named PRNG streams: one key per purpose, so that two kinds of randomness never share a
key (an attack's random start and a defence's random transform of the same item, say).

``stream(seed, purpose)`` folds a stable 31-bit hash of ``purpose`` into ``key(seed)``;
callers fold in item indices, draws or steps from there.
"""

from __future__ import annotations

import zlib

import jax

ATTACK_START = "attack/random_start"  # PGD's random start and R+FGSM's random step.
RAND_TRANSFORM = "defense/rand"  # The random resize + pad of a randomised system.
NOISE_CHECK = "detection/gaussian_noise"  # Benign noise of the detector's false-alarm check.


def stream(seed: int, purpose: str) -> jax.Array:
  """The PRNG key of ``purpose`` under ``seed``."""
  return jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(purpose.encode()) & 0x7FFFFFFF)
