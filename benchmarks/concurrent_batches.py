"""What running two batches at once buys on a CPU (``jaxvars.features.batched_map``).

  python benchmarks/concurrent_batches.py --size=96 --batches=8 --out=/tmp/concurrent.json

XLA's CPU runtime leaves cores idle within one program (element-wise fusions such as the
depthwise shift-and-add, small convolutions); two programs launched from two host threads
run side by side. For the CPU presets' programs at ``--size`` px (EfficientNet-Lite0 with
random weights, the ``cpu`` preset's 16-channel denoiser), each mapped over ``--batches``
batches of ``--batch`` images with ``batched_map`` at ``--workers`` (1 = one batch at a
time, the async-dispatch form), best of ``--repeats`` after a warm-up: the feature pass,
PGD-``--pgd_steps`` on the feature-space objective (one backbone forward + backward per
step), and the denoiser's forward. Checks that every setting gives the same bytes.
Prints a table, writes JSON.
"""

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxvars import provenance, sharding  # noqa: E402
from jaxvars.attacks import pgd  # noqa: E402
from jaxvars.attacks.objectives.feature import feature_distance  # noqa: E402
from jaxvars.backbones import build_backbone  # noqa: E402
from jaxvars.defenses.denoiser import Denoiser  # noqa: E402
from jaxvars.features import batched_map  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "efficientnet_lite0", "A registered backbone.")
_SIZE = flags.DEFINE_integer("size", 96, "Image side (px).")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch (the attacks' batch).")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches mapped per timing.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "3"], "Concurrent batches to compare.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 5, "PGD steps.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions (best reported).")
_OUT = flags.DEFINE_string("out", "concurrent_batches.json", "JSON output path.")


def main(argv):
  del argv
  mesh = sharding.make_mesh(1)
  size, b = _SIZE.value, _BATCH.value
  model = build_backbone(ml_collections.ConfigDict(
      {"arch": _ARCH.value, "width": 64, "small_stem": False}))
  denoiser = Denoiser(channels=16, num_blocks=9, patch=8, attn_dim=64, heads=4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b * _BATCHES.value, size, size, 3), dtype=np.uint8)
  x0 = jax.numpy.zeros((1, size, size, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x0)
  dvars = jax.jit(denoiser.init)(jax.random.key(2), x0)
  e = jax.random.normal(jax.random.key(1), (model.feature_dim, 64)) * 0.03
  pooled = lambda z: model.apply(variables, z)["pooled"]

  @jax.jit
  def features(batch):
    return pooled(batch["images"] / 255.0)

  @jax.jit
  def attack(batch):
    x = batch["images"] / 255.0
    clean = pooled(x)
    loss = lambda z: feature_distance(pooled(z), clean, lambda f: f @ e)
    return pgd(loss, x, eps=8, alpha=2, steps=_PGD_STEPS.value, key=jax.random.key(3))

  @jax.jit
  def denoise(batch):
    return denoiser.apply(dvars, batch["images"] / 255.0)

  programs = {"features": features, f"pgd-{_PGD_STEPS.value}": attack, "denoiser": denoise}
  rows = []
  print(f"{'program':10} {'workers':>7} {'images/s':>10} {'x':>6}")
  for name, fn in programs.items():
    base, reference = None, None
    for workers in (int(w) for w in _WORKERS.value):
      run = lambda: batched_map(fn, {"images": images}, batch_size=b, mesh=mesh, desc=name,
                                workers=workers)
      out = run()
      if reference is None:
        reference = out
      same = bool(np.array_equal(np.asarray(out), np.asarray(reference)))
      best = float("inf")
      for _ in range(_REPEATS.value):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
      rate = len(images) / best
      base = base or rate
      rows.append({"program": name, "workers": workers, "images_per_s": rate,
                   "speedup": rate / base, "same_output": same})
      print(f"{name:10} {workers:7d} {rate:10.1f} {rate / base:6.2f}"
            + ("" if same else "  OUTPUT DIFFERS"), flush=True)
  result = {"jax": jax.__version__, "platform": jax.devices()[0].platform,
            "cpu_count": os.cpu_count(), "arch": _ARCH.value, "image_size": size, "batch": b,
            "batches": _BATCHES.value, "rows": rows, "provenance": provenance.describe()}
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"written {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
