"""Item features from the frozen ResNet, computed once per image set.

``FeatureExtractor`` jits one batched forward pass (sharded over the mesh's
``data`` axis) and maps it over the catalogue; the last batch is padded so the
function compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars import sharding
from jaxvars.models.resnet import ResNet
from jaxvars.progress import progress


def to_float(images_uint8: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] in 0..255 -> float32 in [0, 1]."""
  return images_uint8.astype(jnp.float32) / 255.0


def normalize_features(features: jax.Array, stats: dict, mode: str) -> jax.Array:
  """Normalises pooled features f [..., F] before VBPR.

  Args:
    stats: {'mean': [F], 'std': [F]} of the clean catalogue ('standardize').
    mode: 'standardize' ((f - mean) / std), 'l2' (unit norm) or 'none'.
  """
  if mode == "standardize":
    return (features - stats["mean"]) / stats["std"]
  if mode == "l2":
    return features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-8)
  if mode == "none":
    return features
  raise ValueError(f"feature normalisation {mode!r} is not 'standardize', 'l2' or 'none'")


def feature_stats(features: np.ndarray) -> dict:
  """Per-dimension mean and std [F] of a feature table [I, F] (std floored at 1e-6)."""
  features = np.asarray(features, np.float64)
  return {"mean": features.mean(0).astype(np.float32),
          "std": np.maximum(features.std(0), 1e-6).astype(np.float32)}


class FeatureExtractor:
  """Pooled ResNet features of many images, in jitted, sharded batches.

  Args:
    model: the ResNet (run in eval mode: BatchNorm uses its running statistics).
    variables: {'params': ..., 'batch_stats': ...}.
    mesh: device mesh; ``batch_size`` must divide over its ``data`` axis.
    batch_size: images per jitted call.
  """

  def __init__(self, model: ResNet, variables, mesh, batch_size: int):
    sharding.check_divisible(batch_size, mesh, "config.backbone.feature_batch_size")
    self.mesh, self.batch_size = mesh, batch_size
    self.variables = jax.device_put(variables, sharding.replicated(mesh))

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def pooled(variables, images_uint8):
      return model.apply(variables, to_float(images_uint8), train=False)["pooled"]

    self._pooled = pooled

  def __call__(self, images: np.ndarray, *, desc: str = "item features") -> np.ndarray:
    """Pooled features of uint8 images [N, H, W, 3] -> float32 [N, F] (host array)."""
    n, b = len(images), self.batch_size
    out = []
    for start in progress(range(0, n, b), desc=desc, total=-(-n // b)):
      chunk = images[start:start + b]
      if len(chunk) < b:
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
      feats = self._pooled(self.variables, sharding.shard_batch(chunk, self.mesh))
      out.append(np.asarray(feats)[:min(b, n - start)])
    return np.concatenate(out, axis=0)
