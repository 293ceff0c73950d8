"""Throughput of the two hot loops of this release: item-feature extraction (frozen
ResNet, images/s) and the jitted BPR step (triplets/s), on random inputs.

  python benchmarks/throughput.py --preset=cpu --out=/tmp/throughput.json
  python benchmarks/throughput.py --preset=paper --num_devices=8   # GPU/TPU VM

Prints a table and writes JSON. Timings exclude compilation (one warm-up call) and
wait for the device (block_until_ready).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import joint  # noqa: E402
from jaxvars import sharding, steps  # noqa: E402
from jaxvars.features import FeatureExtractor  # noqa: E402
from jaxvars.models.resnet import make_resnet  # noqa: E402
from jaxvars.models.vbpr import VBPR  # noqa: E402
from jaxvars.train import make_optimizer  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "cpu", "Size preset of configs/joint.py.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices on the data axis (0 = all).")
_IMAGES = flags.DEFINE_integer("images", 1024, "Images whose features are extracted.")
_STEPS = flags.DEFINE_integer("steps", 200, "BPR steps timed.")
_OUT = flags.DEFINE_string("out", "throughput.json", "JSON output path.")


def main(argv):
  del argv
  config = joint.get_config(_PRESET.value)
  mesh = sharding.make_mesh(_NUM_DEVICES.value)
  s = config.data.image_size
  backbone = make_resnet(config.backbone.arch, width=config.backbone.width,
                         small_stem=config.backbone.small_stem)
  variables = backbone.init(jax.random.key(0), jnp.zeros((1, s, s, 3)))
  extractor = FeatureExtractor(backbone, variables, mesh, config.backbone.feature_batch_size)
  images = np.random.default_rng(0).integers(0, 256, (_IMAGES.value, s, s, 3), dtype=np.uint8)
  extractor(images[:config.backbone.feature_batch_size])  # Compile.
  t = time.perf_counter()
  extractor(images)
  feat_s = time.perf_counter() - t

  users, items, batch = 20_000, 50_000, config.vbpr.batch_size
  model = VBPR(num_users=users, num_items=items, feature_dim=backbone.feature_dim,
               factors=config.vbpr.factors, form=config.vbpr.form)
  params = model.init(jax.random.key(1), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                      jnp.zeros((1, backbone.feature_dim)))["params"]
  state = jax.device_put(steps.TrainState.create(apply_fn=model.apply, params=params,
                                                 tx=make_optimizer(config.vbpr, 100)),
                         sharding.replicated(mesh))
  features = jax.device_put(jax.random.normal(jax.random.key(2), (items, backbone.feature_dim)),
                            sharding.replicated(mesh))
  step = steps.make_bpr_step(model, mesh, reg=config.vbpr.reg, reg_visual=config.vbpr.reg_visual)
  rng = np.random.default_rng(0)
  batches = [sharding.shard_batch({"user": rng.integers(0, users, batch, dtype=np.int32),
                                   "pos": rng.integers(0, items, batch, dtype=np.int32),
                                   "neg": rng.integers(0, items, batch, dtype=np.int32)}, mesh)
             for _ in range(8)]
  state, m = step(state, batches[0], features)  # Compile.
  jax.block_until_ready(m)
  t = time.perf_counter()
  for k in range(_STEPS.value):
    state, m = step(state, batches[k % 8], features)
  jax.block_until_ready((state, m))
  step_s = time.perf_counter() - t

  row = {"preset": _PRESET.value, "platform": jax.devices()[0].platform,
         "devices": int(mesh.size), "arch": config.backbone.arch, "image_size": s,
         "feature_images_per_s": _IMAGES.value / feat_s,
         "bpr_steps_per_s": _STEPS.value / step_s,
         "bpr_triplets_per_s": _STEPS.value * batch / step_s, "bpr_batch": batch}
  print(f"{'preset':8} {'platform':8} {'dev':>3} {'arch':9} {'size':>4} {'feat img/s':>11} "
        f"{'BPR steps/s':>12} {'triplets/s':>12}")
  print(f"{row['preset']:8} {row['platform']:8} {row['devices']:3d} {row['arch']:9} "
        f"{s:4d} {row['feature_images_per_s']:11.1f} {row['bpr_steps_per_s']:12.1f} "
        f"{row['bpr_triplets_per_s']:12.0f}")
  with open(_OUT.value, "w") as f:
    json.dump(row, f, indent=2)
  print(f"written {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
