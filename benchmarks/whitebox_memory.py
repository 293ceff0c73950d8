"""Host memory and time of a white-box PGD batch through a defended system, one batch at
a time against two at once (``jaxvars.features.batched_map``'s memory guard).

  python benchmarks/whitebox_memory.py --config=configs/joint.py:cpu,hm --out=/tmp/wb.json

At the preset's shapes (its backbone, denoiser and detector on their random initial
weights; a random feature table; the H&M sizes by default), the program a white-box attack
compiles (``attack.pgd_steps`` PGD steps on the paper's eq. 3 through ``--through``, with the
detector penalty where ``--detector_lambda`` > 0) is mapped over ``--batches`` batches of
``config.attack.batch_size`` random photos, once per setting of ``--workers``, each in a
fresh subprocess, so that each peak RSS (``getrusage``) is that setting's alone. A setting
of 2 runs two batches at once even above the guard (``max_temp_bytes`` lifted); 'guard'
lets ``batched_map`` decide. Reports the program's XLA temporaries, the wall time (compile
included) and the peak RSS; checks that every setting gives the same bytes. Prints a table,
writes JSON.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "A joint config (configs/joint.py:...).")
_WORKERS = flags.DEFINE_list("workers", ["2", "guard"], "Settings: an int, or 'guard'.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches mapped.")
_THROUGH = flags.DEFINE_string("through", "defended", "The defended system attacked through.")
_LAMBDA = flags.DEFINE_float("detector_lambda", 1.0, "Detector-aware penalty (0 = none).")
_USERS = flags.DEFINE_integer("users", 887, "Users (H&M's).")
_ITEMS = flags.DEFINE_integer("items", 16581, "Items of the feature table (H&M's).")
_OUT = flags.DEFINE_string("out", "", "JSON output path ('' = none).")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one setting and print its JSON.")


def _one(config, setting: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxvars import features, sharding
  from jaxvars.attacks.spec import attack_spec
  from jaxvars.attacks.whitebox import attack_loss
  from jaxvars.experiment import build_models
  from jaxvars.pixels import to_float, to_uint8
  u, n_items, s = _USERS.value, _ITEMS.value, int(config.data.image_size)
  models, backbone_vars, params = build_models(config, num_users=u, num_items=n_items)
  f = int(models.backbone.feature_dim)
  rng = np.random.default_rng(0)
  consts = {"backbone": backbone_vars, "stats": {"mean": jnp.zeros(f), "std": jnp.ones(f)},
            "features": jnp.asarray(rng.normal(size=(n_items, f)).astype(np.float32))}
  spec = attack_spec(config.attack, "pgd", 8.0, objective="bpr", through=_THROUGH.value)
  spec = dataclasses.replace(spec, detector_lambda=_LAMBDA.value)
  b, per = int(config.attack.batch_size), int(config.attack.triplets_per_item)
  n = b * _BATCHES.value

  @jax.jit
  def craft(batch):
    loss_fn, stochastic = attack_loss(
        spec, models=models, params=params, consts=consts, config=config,
        items=batch["items"], inputs={k: batch[k] for k in batch if k not in ("images", "items")},
        num_users=u, threshold=0.5)
    return to_uint8(spec.run_loss(loss_fn, to_float(batch["images"]), jax.random.key(0),
                                  stochastic=stochastic))

  users = lambda: rng.integers(0, u, size=(n, per)).astype(np.int32)
  items = lambda: rng.integers(0, n_items, size=(n, per)).astype(np.int32)
  inputs = {"images": rng.integers(0, 256, size=(n, s, s, 3)).astype(np.uint8),
            "items": np.arange(n, dtype=np.int32), "pos_users": users(), "pos_negs": items(),
            "neg_users": users(), "neg_pos": items(), "pos_mask": np.ones((n, per), np.float32)}
  mesh = sharding.make_mesh(1)
  first = sharding.shard_batch({k: v[:b] for k, v in inputs.items()}, mesh)
  temp = craft.lower(first).compile().memory_analysis().temp_size_in_bytes
  guard = setting == "guard"
  t = time.perf_counter()
  out = features.batched_map(craft, inputs, batch_size=b, mesh=mesh, desc="white-box PGD",
                             workers=None if guard else int(setting),
                             max_temp_bytes=None if guard else 1 << 62)
  seconds = time.perf_counter() - t
  return {"setting": setting, "seconds": seconds, "temp_gb": temp / 1e9,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
          "guard_gb": features.CPU_CONCURRENT_MAX_TEMP_BYTES / 1e9,
          "sum": int(out.astype(np.int64).sum()), "spec": spec.name}


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(_one(_CONFIG.value, _CHILD.value)))
    return
  from jaxvars import provenance
  rows = []
  for setting in _WORKERS.value:
    cmd = [sys.executable, __file__, "--child", setting] + [
        a for a in sys.argv[1:] if not a.startswith(("--out", "--workers"))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
      raise SystemExit(f"setting {setting} failed:\n{res.stderr[-3000:]}")
    rows.append(json.loads(line[0][len("RESULT "):]))
  if len({r["sum"] for r in rows}) != 1:
    raise SystemExit(f"the settings gave different attacked photos: {rows}")
  print(f"{rows[0]['spec']} through {_THROUGH.value}, {_BATCHES.value} batches; XLA "
        f"temporaries {rows[0]['temp_gb']:.2f} GB per batch (guard {rows[0]['guard_gb']:.2f} GB)")
  print(f"{'batches at once':>16} | {'seconds':>8} | {'peak RSS GB':>11}")
  for r in rows:
    print(f"{r['setting']:>16} | {r['seconds']:8.1f} | {r['peak_rss_gb']:11.2f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"rows": rows, "provenance": provenance.describe()}, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
