"""Item features from the frozen backbone, computed once per image set, and their
normalisation before the recommender.

``FeatureExtractor`` jits one batched forward pass (sharded over the mesh's
``data`` axis) and maps it over the catalogue; the last batch is padded so the
function compiles once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools

import jax
import numpy as np
import optax
from absl import logging

from jaxvars import distributed, sharding
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


# Batches ``batched_map`` runs at once on a one-device CPU mesh (read at call time, so a
# benchmark can set 1 to measure what the overlap buys). XLA's CPU runtime leaves a core idle
# for much of one program (depthwise shift-and-add fusions, small convolutions), and two
# programs launched from two host threads run side by side, so two batches at once get
# through more batches per second than one at a time (benchmarks/concurrent_batches.py).
CPU_CONCURRENT_BATCHES = 2

# A program whose XLA temporaries (``memory_analysis().temp_size_in_bytes``) exceed this
# runs one batch at a time even where ``CPU_CONCURRENT_BATCHES`` would run two: two at once
# hold both programs' temporaries. At ``cpu,hm``'s shapes a white-box PGD-5 batch through
# the denoiser and the detector needs 2.0 GB of them, and two at once set the run's peak
# host memory (docs/performance.md#host-memory-what-sets-a-runs-peak); the transferred
# attacks and feature passes stay below and keep the overlap.
CPU_CONCURRENT_MAX_TEMP_BYTES = 1 << 30


def concurrent_batches(mesh) -> int:
  """How many batches :func:`batched_map` keeps running at once on ``mesh``:
  ``CPU_CONCURRENT_BATCHES`` on a one-device CPU mesh, else 1 (an accelerator already
  overlaps them through async dispatch; a multi-device mesh's programs hold collectives,
  which two concurrent programs could interleave)."""
  devices = list(mesh.devices.flat)
  if len(devices) == 1 and devices[0].platform == "cpu":
    return max(1, int(CPU_CONCURRENT_BATCHES))
  return 1


def batched_map(fn, inputs: dict, *, batch_size: int, mesh, desc: str,
                workers: int | None = None, max_temp_bytes: int | None = None,
                out: dict | None = None):
  """Applies a jitted ``fn(batch: dict) -> array [b, ...]`` (or a pytree of such arrays)
  over host arrays in batches.

  The leading dimension of every array in ``inputs`` is split into batches of
  ``batch_size`` (the last one padded by repeating its first row, so ``fn`` compiles
  once), each sharded over the mesh's ``data`` axis. ``workers`` batches run at once
  (default :func:`concurrent_batches`): with 1, the next batch is sliced and sent while
  the device computes the current one (async dispatch); with more, each runs from its own
  host thread (on a CPU this is what keeps every core busy), after the first batch has run
  alone (``fn`` compiles once). Every batch is computed independently, so the outputs do
  not depend on ``workers``.

  Where more than one would run at once and ``fn`` is a ``jax.jit`` function, it is
  compiled ahead of the first batch and its XLA temporaries read: a program needing more
  than ``max_temp_bytes`` (default ``CPU_CONCURRENT_MAX_TEMP_BYTES``) runs one batch at a
  time, so that a memory-heavy program (a white-box PGD through the denoiser) does not hold
  its temporaries twice. The same executable runs either way (same outputs).

  ``out`` ({key: writable array [N, ...]}, for a ``fn`` returning a dict) receives those
  outputs batch by batch instead of a concatenation in memory: a memory-mapped ``.npy``
  (``np.lib.format.open_memmap``) then holds a catalogue larger than host memory, e.g. an
  attacked catalogue of ``config.data.image_store='mmap'``.

  The inputs are only sliced (``v[start:start + batch_size]``), so a memory-mapped input
  is read one batch at a time.

  Returns:
    numpy array [N, ...] (or the pytree of them), the concatenated outputs without the
    padding (the keys of ``out``: those arrays, filled).

  Raises:
    ValueError: an ``out`` array whose length, shape or dtype is not the output's.
  """
  sharding.check_divisible(batch_size, mesh, f"batch size of {desc!r}")
  n = len(next(iter(inputs.values())))
  workers = concurrent_batches(mesh) if workers is None else max(1, int(workers))
  total = -(-n // batch_size)

  out = dict(out or {})
  for key, target in out.items():
    if len(target) != n:
      raise ValueError(f"{desc}: out[{key!r}] holds {len(target)} rows for {n} inputs")

  def send(start):
    m = min(batch_size, n - start)
    return fn(sharding.shard_batch(_chunk(inputs, start, batch_size), mesh)), start, m

  def fetch(sent):
    result, start, m = sent
    if out:
      result = dict(result)
      for key, target in out.items():
        part = distributed.to_host(result.pop(key))[:m]
        if part.shape[1:] != target.shape[1:] or part.dtype != target.dtype:
          raise ValueError(f"{desc}: out[{key!r}] is {target.dtype} {list(target.shape)}, "
                           f"the output is {part.dtype} [{n}, {', '.join(map(str, part.shape[1:]))}]")
        target[start:start + m] = part
    return jax.tree.map(lambda a: distributed.to_host(a)[:m], result)

  if workers > 1 and total > 1 and hasattr(fn, "lower"):
    fn, workers = _compiled_for_concurrency(
        fn, send_args=lambda: sharding.shard_batch(_chunk(inputs, 0, batch_size), mesh),
        workers=workers, desc=desc,
        max_temp_bytes=(CPU_CONCURRENT_MAX_TEMP_BYTES if max_temp_bytes is None
                        else int(max_temp_bytes)))
  starts = range(0, n, batch_size)
  if workers == 1 or total <= 1:
    parts_list, pending = [], None
    for start in progress(starts, desc=desc, total=total):
      sent = send(start)
      if pending is not None:
        parts_list.append(fetch(pending))
      pending = sent
    if pending is not None:
      parts_list.append(fetch(pending))
  else:
    parts_list = list(progress(_concurrent(lambda s: fetch(send(s)), starts, workers),
                               desc=desc, total=total))
  result = jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *parts_list)
  return dict(result, **out) if out else result


def _chunk(inputs: dict, start: int, batch_size: int) -> dict:
  """Rows [start, start + batch_size) of every input, the last batch padded by repeating
  its first row."""
  chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
  m = len(next(iter(chunk.values())))
  if m < batch_size:
    chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - m, axis=0)])
             for k, v in chunk.items()}
  return chunk


def _compiled_for_concurrency(fn, *, send_args, workers: int, desc: str,
                              max_temp_bytes: int):
  """(executable, workers): ``fn`` (a ``jax.jit`` function of one batch) compiled for the
  first batch's shapes and shardings, and ``workers``, or 1 where its XLA temporaries
  exceed ``max_temp_bytes`` (backends without a memory analysis keep ``workers``)."""
  compiled = fn.lower(send_args()).compile()
  memory = compiled.memory_analysis()
  temp = int(getattr(memory, "temp_size_in_bytes", 0) or 0) if memory is not None else 0
  if temp > max_temp_bytes:
    logging.info("%s: one batch at a time (the program's XLA temporaries are %.2f GB, above "
                 "the %.2f GB that runs %d at once)", desc, temp / 1e9, max_temp_bytes / 1e9,
                 workers)
    workers = 1
  return compiled, workers


def _concurrent(run, starts, workers: int):
  """Yields ``run(start)`` for every start, in order: the first alone, then ``workers`` at
  a time from a thread pool."""
  starts = iter(starts)
  first = next(starts, None)
  if first is None:
    return
  yield run(first)
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="batched_map")
  pending = collections.deque()
  try:
    for start in starts:
      pending.append(pool.submit(run, start))
      if len(pending) >= workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


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
    self.variables = distributed.put(variables, sharding.replicated(mesh))

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def pooled(variables, images_uint8):
      return model.apply(variables, to_float(images_uint8), train=False)["pooled"]

    self._pooled = pooled

  def __call__(self, images: np.ndarray, *, desc: str = "item features") -> np.ndarray:
    """Pooled features of uint8 images [N, H, W, 3] -> float32 [N, F] (host array)."""
    return batched_map(lambda b: self._pooled(self.variables, b["images"]), {"images": images},
                       batch_size=self.batch_size, mesh=self.mesh, desc=desc)
