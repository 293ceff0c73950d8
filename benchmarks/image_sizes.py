"""What a backbone costs by image size on this machine: the feature pass and PGD (images/s),
and the denoiser's forward pass, to choose the CPU presets' image size.

  python benchmarks/image_sizes.py --arch=efficientnet_lite0 --sizes=96,128,160,224 \\
      --out=/tmp/image_sizes.json
  python benchmarks/image_sizes.py --sizes=64 --dtype=float32,bfloat16   # config.dtype's cost

For each size: the jitted feature pass (batch ``--batch``), PGD with ``--pgd_steps`` steps
on the feature-space objective through VBPR's visual projection (the cost of eq. 3's
attack: one backbone forward + backward per step), and the CPU preset's denoiser forward.
``--dtype``: the compute dtypes to time (``config.dtype``: the backbone and the denoiser
in it, parameters float32), interleaved per size. Best of ``--repeats`` after a warm-up.
Prints a table, writes JSON.
"""

import json
import os
import sys
import time

import jax
import ml_collections
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxvars import provenance  # noqa: E402
from jaxvars.attacks import pgd  # noqa: E402
from jaxvars.attacks.objectives.feature import feature_distance  # noqa: E402
from jaxvars.backbones import build_backbone, with_dtype  # noqa: E402
from jaxvars.defenses.denoiser import Denoiser  # noqa: E402
from jaxvars.models import compute_dtype  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "efficientnet_lite0", "A registered backbone.")
_SIZES = flags.DEFINE_list("sizes", ["96", "128", "160", "224"], "Image sides (px).")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 5, "PGD steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (best reported).")
_OUT = flags.DEFINE_string("out", "image_sizes.json", "JSON output path.")
_DTYPE = flags.DEFINE_list("dtype", ["float32"], "Compute dtypes to time (config.dtype values).")


def _best(fn, *args):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main(argv):
  del argv
  cfg = ml_collections.ConfigDict({"arch": _ARCH.value, "width": 64, "small_stem": False})
  rows = []
  print(f"{'arch':20} {'dtype':9} {'px':>4} {'features img/s':>15} "
        f"{'PGD-' + str(_PGD_STEPS.value) + ' img/s':>13} {'denoiser img/s':>15}")
  for size, dtype in ((int(s), d) for s in _SIZES.value for d in _DTYPE.value):
    model = with_dtype(build_backbone(cfg), compute_dtype(dtype), arch=_ARCH.value)
    denoiser = Denoiser(channels=16, num_blocks=9, patch=8, attn_dim=64, heads=4,
                        dtype=compute_dtype(dtype))
    x = jax.random.uniform(jax.random.key(size), (_BATCH.value, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    e = jax.random.normal(jax.random.key(1), (model.feature_dim, 64)) * 0.03
    pooled = lambda z: model.apply(variables, z)["pooled"]
    clean = pooled(x)
    feats = jax.jit(pooled)
    loss = lambda z: feature_distance(pooled(z), clean, lambda f: f @ e)
    attack = jax.jit(lambda z, k: pgd(loss, z, eps=8, alpha=2, steps=_PGD_STEPS.value, key=k))
    dvars = jax.jit(denoiser.init)(jax.random.key(2), x[:1])
    denoise = jax.jit(lambda z: denoiser.apply(dvars, z))
    t_feat = _best(feats, x)
    t_pgd = _best(attack, x, jax.random.key(3))
    t_den = _best(denoise, x)
    row = {"arch": _ARCH.value, "dtype": dtype, "image_size": size, "batch": _BATCH.value,
           "feature_images_per_s": _BATCH.value / t_feat,
           "pgd_images_per_s": _BATCH.value / t_pgd, "pgd_steps": _PGD_STEPS.value,
           "denoiser_images_per_s": _BATCH.value / t_den}
    rows.append(row)
    print(f"{_ARCH.value:20} {dtype:9} {size:4d} {row['feature_images_per_s']:15.1f} "
          f"{row['pgd_images_per_s']:13.1f} {row['denoiser_images_per_s']:15.1f}", flush=True)
  out = {"jax": jax.__version__, "platform": jax.devices()[0].platform,
         "cpu_count": os.cpu_count(), "rows": rows, "provenance": provenance.describe()}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=2)
  print(f"written {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
