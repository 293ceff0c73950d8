"""Item features from the frozen backbone, computed once per image set, and their
normalisation before the recommender.

``FeatureExtractor`` jits one batched forward pass (sharded over the mesh's
``data`` axis) and maps it over the catalogue; the last batch is padded so the
function compiles once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from jaxvars import sharding
from jaxvars.pixels import to_float
from jaxvars.progress import progress

FEATURE_NORMS = ("standardize", "l2", "none")  # config.backbone.feature_norm


def normalize_features(features: jax.Array, stats: dict, mode: str) -> jax.Array:
  """Normalises pooled features f [..., F] before the recommender.

  Args:
    stats: {'mean': [F], 'std': [F]} of the clean catalogue ('standardize').
    mode: 'standardize' ((f - mean) / std), 'l2' (unit norm) or 'none'.

  Raises:
    ValueError: unknown mode.
  """
  if mode == "standardize":
    return (features - stats["mean"]) / stats["std"]
  if mode == "l2":
    return features / optax.safe_norm(features, 1e-8, axis=-1, keepdims=True)  # Finite grad at 0.
  if mode == "none":
    return features
  raise ValueError(f"feature normalisation {mode!r} is not one of {FEATURE_NORMS}")


def feature_stats(features: np.ndarray) -> dict:
  """Per-dimension mean and std [F] of a feature table [I, F] (std floored at 1e-6)."""
  features = np.asarray(features, np.float64)
  return {"mean": features.mean(0).astype(np.float32),
          "std": np.maximum(features.std(0), 1e-6).astype(np.float32)}


def batched_map(fn, inputs: dict, *, batch_size: int, mesh, desc: str):
  """Applies a jitted ``fn(batch: dict) -> array [b, ...]`` (or a pytree of such arrays)
  over host arrays in batches.

  The leading dimension of every array in ``inputs`` is split into batches of
  ``batch_size`` (the last one padded by repeating its first row, so ``fn`` compiles
  once), each sharded over the mesh's ``data`` axis. The next batch is sliced and sent
  while the device computes the current one (one batch in flight: async dispatch).

  Returns:
    numpy array [N, ...] (or the pytree of them), the concatenated outputs without the
    padding.
  """
  sharding.check_divisible(batch_size, mesh, f"batch size of {desc!r}")
  n = len(next(iter(inputs.values())))
  out, pending = [], None
  for start in progress(range(0, n, batch_size), desc=desc, total=-(-n // batch_size)):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    m = len(next(iter(chunk.values())))
    if m < batch_size:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - m, axis=0)])
               for k, v in chunk.items()}
    result = fn(sharding.shard_batch(chunk, mesh))
    if pending is not None:
      out.append(jax.tree.map(lambda a, m=pending[1]: np.asarray(a)[:m], pending[0]))
    pending = (result, m)
  if pending is not None:
    out.append(jax.tree.map(lambda a, m=pending[1]: np.asarray(a)[:m], pending[0]))
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *out)


class FeatureExtractor:
  """Pooled backbone features of many images, in jitted, sharded batches.

  Args:
    model: the backbone (run in eval mode: BatchNorm uses its running statistics).
    variables: {'params': ..., 'batch_stats': ...}.
    mesh: device mesh; ``batch_size`` must divide over its ``data`` axis.
    batch_size: images per jitted call.
  """

  def __init__(self, model, variables, mesh, batch_size: int):
    sharding.check_divisible(batch_size, mesh, "config.backbone.feature_batch_size")
    self.mesh, self.batch_size = mesh, batch_size
    self.variables = jax.device_put(variables, sharding.replicated(mesh))

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def pooled(variables, images_uint8):
      return model.apply(variables, to_float(images_uint8), train=False)["pooled"]

    self._pooled = pooled

  def __call__(self, images: np.ndarray, *, desc: str = "item features") -> np.ndarray:
    """Pooled features of uint8 images [N, H, W, 3] -> float32 [N, F] (host array)."""
    return batched_map(lambda b: self._pooled(self.variables, b["images"]), {"images": images},
                       batch_size=self.batch_size, mesh=self.mesh, desc=desc)
