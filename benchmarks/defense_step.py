"""What one step of each defence stage costs: seconds per jitted step and items/s, by the
kind of input the step crafts (clean, FGSM, PGD), at a preset's shapes on one device.

  python benchmarks/defense_step.py --preset=cpu --out=/tmp/defense_step.json
  python benchmarks/defense_step.py --preset=cpu,hm,full   # 32 px, the full run's shapes
  python benchmarks/defense_step.py --preset=cpu --bpr_other=clean,defended,defended_frozen \
      --table_pass --out=/tmp/bpr_other.json   # config.defense.bpr_other's cost (issue 35)

The stages are the preset's ``config.stages`` (their loss terms and trainable groups) and
the models its backbone (the preset's weights, e.g. ImageNet EfficientNet-Lite0) and
denoiser (random weights), with the preset's defence batch, image size and training attack,
on random photos and a random VBPR. Timings on a 2-core machine vary between processes:
compare checkouts in alternating runs. Every stage is timed on
each input kind its mix can draw, best of ``--repeats`` after a warm-up (compilation is
reported apart). ``--bpr_other`` times each stage with the BPR term under each value of
``config.defense.bpr_other`` (the other item of each triplet through D in the step), and
``--table_pass`` the forward pass f(D(x)) per photo: what recomputing the deployed table of
every item would cost per defence epoch instead. ``--repo`` measures another checkout of jaxvars with this same script
(e.g. an older commit, for a before/after table). Prints a table, writes JSON.
"""

import json
import os
import sys
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "cpu", "Presets of configs/joint.py (e.g. cpu, cpu,hm,full).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Image side (px); 0 = the preset's.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per stage and input kind (best reported).")
_STAGES = flags.DEFINE_list("stages", [], "Stages to time; default every stage with epochs > 0.")
_RANDOM_BACKBONE = flags.DEFINE_bool(
    "random_backbone", False, "Random backbone weights instead of the preset's `backbone.init`.")
_REPO = flags.DEFINE_string("repo", os.path.join(os.path.dirname(__file__), ".."),
                            "The jaxvars checkout to measure.")
_OUT = flags.DEFINE_string("out", "defense_step.json", "JSON output path.")
_BPR_OTHER = flags.DEFINE_list(
    "bpr_other", ["clean"], "Values of config.defense.bpr_other to time (stages with the BPR term).")
_TABLE_PASS = flags.DEFINE_bool(
    "table_pass", False, "Also time f(D(x)) per photo (a deployed-table refresh's unit cost).")

KINDS = ("clean", "fgsm", "pgd")


def main(argv):
  del argv
  sys.path.insert(0, os.path.abspath(_REPO.value))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax.training.train_state import TrainState

  import jaxvars
  from configs import joint
  from jaxvars import sharding
  from jaxvars.attacks.spec import attack_spec
  from jaxvars.backbones import build_backbone, load_backbone
  from jaxvars.data import splits
  from jaxvars.defenses.denoiser import Denoiser
  from jaxvars.defenses.detector import ProjectionHead
  from jaxvars.features import feature_stats, normalize_features
  from jaxvars.models import Models
  from jaxvars.recommenders import build_recommender
  from jaxvars.training.defense_step import make_defense_step, stage_optimizer

  config = joint.get_config(_PRESET.value)
  s = _IMAGE_SIZE.value or config.data.image_size
  num_users, num_items, dn = 400, 600, config.denoiser
  image0 = jnp.zeros((1, s, s, 3), jnp.float32)
  if _RANDOM_BACKBONE.value:
    backbone = build_backbone(config.backbone)
    bvars = jax.jit(backbone.init)(jax.random.key(0), image0)
  else:  # The preset's weights (ImageNet for the CPU presets): what its runs compute on.
    backbone, bvars = load_backbone(config.backbone, image_size=s, key=jax.random.key(0))
  rec = build_recommender(config.recommender, num_users=num_users, num_items=num_items,
                          feature_dim=backbone.feature_dim)
  denoiser = Denoiser(channels=dn.channels, num_blocks=dn.num_blocks, patch=dn.patch,
                      attn_dim=dn.attn_dim, heads=dn.heads)
  head = ProjectionHead(hidden=config.detector.hidden, out=config.detector.dim)
  params = jax.device_get({
      "recommender": rec.init(jax.random.key(1), backbone.feature_dim),
      "denoiser": jax.jit(denoiser.init)(jax.random.key(2), image0)["params"],
      "detector": {"head": head.init(jax.random.key(3),
                                     jnp.zeros((1, backbone.feature_dim)))["params"]}})
  models = Models(backbone=backbone, recommender=rec, denoiser=denoiser, head=head,
                  feature_norm=config.backbone.feature_norm, rand_min_scale=dn.rand_min_scale,
                  rand_pad=dn.rand_pad)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_items, s, s, 3), dtype=np.uint8)
  pooled = jax.jit(lambda x: backbone.apply(bvars, x / 255.0)["pooled"])
  raw = np.concatenate([pooled(images[i:i + 100]) for i in range(0, num_items, 100)])
  stats = feature_stats(raw)
  consts = jax.device_get({"backbone": bvars, "stats": stats, "features": normalize_features(
      jnp.asarray(raw), stats, config.backbone.feature_norm)})
  n = num_users * 10
  users, items, _ = splits.binarize(rng.integers(0, num_users, n), rng.integers(0, num_items, n),
                                    np.zeros(n, np.int64))
  b = config.defense.batch_size
  batch_items = rng.choice(num_items, b, replace=False).astype(np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=num_users, num_items=num_items,
                                  positive_keys=splits.pair_keys(users, items, num_items),
                                  per_role=config.defense.triplets_per_item, rng=rng)
  mesh = sharding.make_mesh(1)
  host_batch = {"images": images[batch_items], "items": batch_items, "triplets": triplets}
  batch = sharding.shard_batch(host_batch, mesh)
  others = dict(host_batch)
  if any(o != "clean" for o in _BPR_OTHER.value):
    from jaxvars.training.defense_step import OTHER_IMAGES, other_items
    others[OTHER_IMAGES] = images[other_items(triplets)]
  others = sharding.shard_batch(others, mesh)
  consts = jax.device_put(consts, sharding.replicated(mesh))
  attack = attack_spec(config.attack, "pgd", config.defense.train_eps, objective="bpr")

  names = _STAGES.value or [k for k, v in config.stages.items() if v.epochs > 0]
  rows = []
  print(f"{_PRESET.value}: {config.backbone.arch} at {s} px, denoiser {dn.channels} channels, "
        f"defence batch {b}, PGD-{config.attack.pgd_steps}; {jax.devices()[0].platform}; "
        f"jaxvars from {os.path.dirname(jaxvars.__file__)}")
  print(f"{'stage':16} {'input':6} {'bpr_other':15} {'s/step':>7} {'items/s':>8} "
        f"{'compile s':>9}")
  for name, kind, k, bpr_other, stage in (
      (name, kind, k, o, config.stages[name]) for name in names
      for k, kind in enumerate(KINDS) for o in _BPR_OTHER.value):
    weights = {t: float(config.loss[t]) for t in stage.terms}
    if not stage.mix[k] or (bpr_other != "clean" and not weights.get("bpr")):
      continue
    mix = tuple(int(i == k) for i in range(3))
    step = make_defense_step(models, mesh, weights=weights, mix=mix, attack=attack,
                             temperature=config.detector.temperature,
                             **({"bpr_other": bpr_other} if bpr_other != "clean" else {}))
    step_batch = batch if bpr_other == "clean" else others
    state = jax.device_put(TrainState.create(
        apply_fn=None, params=params, tx=stage_optimizer(tuple(stage.trainable), stage.lr)),
        sharding.replicated(mesh))
    t = time.perf_counter()
    state, m = step(state, step_batch, consts, jax.random.key(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    best = float("inf")
    for r in range(_REPEATS.value):
      t = time.perf_counter()
      state, m = step(state, step_batch, consts, jax.random.key(r + 1))
      jax.block_until_ready(m)
      best = min(best, time.perf_counter() - t)
    assert int(m["input_kind"]) == k
    rows.append({"stage": name, "input": kind, "bpr_other": bpr_other, "step_s": best,
                 "items_per_s": b / best, "compile_s": compile_s, "loss": float(m["loss"])})
    print(f"{name:16} {kind:6} {bpr_other:15} {best:7.3f} {b / best:8.1f} {compile_s:9.1f}",
          flush=True)
  table_pass = None
  if _TABLE_PASS.value:  # f(D(x)) of a feature batch: a deployed-table refresh's unit cost.
    fb = int(config.backbone.feature_batch_size)
    fwd = jax.jit(lambda x: models.features(consts, models.denoise(params, x / 255.0)))
    x = jnp.asarray(images[:fb])
    jax.block_until_ready(fwd(x))
    best = float("inf")
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      jax.block_until_ready(fwd(x))
      best = min(best, time.perf_counter() - t)
    table_pass = {"batch": fb, "batch_s": best, "s_per_photo": best / fb}
    print(f"f(D(x)) forward: {best / fb * 1e3:.2f} ms per photo (batch {fb})")
  out = {"preset": _PRESET.value, "table_pass": table_pass, "image_size": s, "batch": b, "arch": config.backbone.arch,
         "denoiser_channels": dn.channels,
         "backbone_init": "random" if _RANDOM_BACKBONE.value else config.backbone.init, "jaxvars": os.path.dirname(jaxvars.__file__),
         "jax": jax.__version__, "rows": rows}
  try:  # --repo may name a checkout from before jaxvars.provenance.
    from jaxvars import provenance  # noqa: PLC0415
    out["provenance"] = provenance.describe()
  except ImportError:
    pass
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
