"""The run planner: what a run of a config will cost, before paying for an accelerator.

  python -m jaxvars.planner --config=configs/joint.py[:presets] [--accelerators=cpu,h100]
      [--utilization=0.4] [--out=plan.json]
  python -m jaxvars.main --config=... --workdir=DIR --mode=plan     # writes DIR/plan.json

For a config, every jitted step a run repeats is *compiled, not run*, at its real shapes
(one recommender step per training stage of every recommender of ``config.recommenders``,
one step per input kind of every defence stage, one FGSM batch, the feature pass of the
clean catalogue and the systems' feature pass), on the backend this process has. From
XLA's cost analysis of each compiled step (``Compiled.cost_analysis()``: FLOPs and bytes
accessed) and its memory analysis (arguments, outputs and temporaries per device), times
the number of times the run repeats it, the planner reports:

* the run's FLOPs and bytes, step by step and in total;
* the device memory the largest step needs, against each accelerator's;
* the estimated wall time on each named accelerator: per step ``max(FLOPs / (peak FLOP/s
  x u), bytes / (memory bandwidth x u))`` (a roofline) at utilisation ``u``
  (``--utilization``, stated in the output), from the public peak numbers in
  :data:`ACCELERATORS`, summed over the steps. ``cpu`` is this machine: FLOPs over the
  FLOP/s of a convolution timed here for about a second (``measure_cpu``), compute only,
  with no utilisation on top (an achieved rate, not a peak). It depends on what else the
  machine runs at that moment: plan on an idle machine.

What it counts, and what it leaves out (the output says so too):

* PGD-k is counted as k + 1 FGSM batches (k gradient steps and the best-iterate loss); on
  an accelerator XLA keeps PGD's loop as a while loop, whose cost analysis would count one
  iteration, so the planner never compiles PGD itself. A defence stage's PGD inputs are
  planned the same way.
* The recommenders' BPR steps are compiled one step at a time (training scans them per
  epoch); DVBPR's steps carry its CNN.
* Not planned: the adaptive and white-box attacks, the targeted attacks, detection scores,
  the full-ranking metrics, the ablation variants, data preparation and checkpoint I/O.
  On the CPU presets these are most of the remaining time (docs/performance.md).

Source of the peak numbers: NVIDIA's H100 (SXM) / H200 / A100 (SXM 80 GB) datasheets,
dense (no sparsity); Google Cloud's TPU v4 / v5e / v5p system architecture pages. float32
compute is planned at the TF32 tensor-core rate on GPUs (XLA's default precision for f32
convolutions and matmuls there) and at the bf16 rate on TPUs (one bf16 pass, JAX's default
precision).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvars import configuration, families, sharding
from jaxvars.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One device's public peak numbers.

  Attributes:
    name: the product. flops: peak dense FLOP/s of float32 compute as XLA runs it (TF32 on
      GPUs, one bf16 pass on TPUs). flops_bf16: peak dense bfloat16 FLOP/s.
    bandwidth: memory bandwidth, bytes/s. memory: device memory, bytes (0: unknown).
    measured: the numbers were measured here (achieved, not peak): :func:`estimate` then
      applies no utilisation.
  """
  name: str
  flops: float
  flops_bf16: float
  bandwidth: float
  memory: float
  measured: bool = False


ACCELERATORS = {
    "h100": Accelerator("NVIDIA H100 SXM (80 GB)", 494.7e12, 989.4e12, 3.35e12, 80e9),
    "h200": Accelerator("NVIDIA H200 SXM (141 GB)", 494.7e12, 989.4e12, 4.8e12, 141e9),
    "a100": Accelerator("NVIDIA A100 SXM (80 GB)", 156e12, 312e12, 2.039e12, 80e9),
    "tpu_v4": Accelerator("Google TPU v4 (one chip)", 275e12, 275e12, 1.2e12, 32e9),
    "tpu_v5e": Accelerator("Google TPU v5e (one chip)", 197e12, 197e12, 0.819e12, 16e9),
    "tpu_v5p": Accelerator("Google TPU v5p (one chip)", 459e12, 459e12, 2.765e12, 95e9),
}
DEFAULT_UTILIZATION = 0.4


def accelerator_for(device_kind: str) -> str | None:
  """The key of :data:`ACCELERATORS` of a ``jax.Device.device_kind`` ('NVIDIA H100 80GB
  HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'TPU v5 lite' -> 'tpu_v5e'), or None where the
  table has no such device: CPUs, and the H100 PCIe / NVL and H200 NVL, whose peaks are
  lower than the SXM parts' in the table."""
  k = device_kind.lower().strip()
  if "h100" in k and "pcie" not in k and "nvl" not in k:
    return "h100"
  if "h200" in k and "nvl" not in k:
    return "h200"
  if "a100" in k:  # SXM and PCIe: the same peak numbers.
    return "a100"
  if k.startswith("tpu"):
    if "v4" in k:
      return "tpu_v4"
    if "v5 lite" in k or "v5e" in k or "v5litepod" in k:
      return "tpu_v5e"
    if "v5p" in k or k == "tpu v5":
      return "tpu_v5p"
  return None


@dataclasses.dataclass
class Step:
  """One planned step: what XLA says one call costs, and how often the run calls it.

  Attributes:
    name: what it is ('recommender vbpr/bpr', 'defence joint (pgd)', 'FGSM batch', ...).
    count: calls in the run (float: a defence stage's input kinds are expected counts).
    flops, bytes: XLA's cost analysis of one call (FLOPs; bytes accessed).
    memory: bytes one call needs on a device (arguments + outputs + temporaries - aliased).
    compile_s: seconds spent compiling it here.
  """
  name: str
  count: float
  flops: float
  bytes: float
  memory: float
  compile_s: float


def _cost(lowered_fn, *args) -> tuple[float, float, float, float]:
  """(FLOPs, bytes accessed, device bytes, compile seconds) of a jitted function at
  ``args`` (``jax.ShapeDtypeStruct`` leaves)."""
  t = time.perf_counter()
  compiled = lowered_fn.lower(*args).compile()
  seconds = time.perf_counter() - t
  return cost_of(compiled) + (seconds,)


def cost_of(compiled) -> tuple[float, float, float]:
  """(FLOPs, bytes accessed, device bytes) of a compiled executable (``jax.stages.
  Compiled``), from XLA's cost and memory analyses (0 where the backend gives none).
  ``cost_analysis()`` is a dict in newer jax and a one-element list of dicts in older."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})
  mem = compiled.memory_analysis()
  need = 0.0
  if mem is not None:
    need = float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0)), need


def _spec(shape, dtype, sharding_=None):
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding_)


def _shapes(tree, sharding_=None):
  return jax.tree.map(lambda a: _spec(np.shape(a), a.dtype, sharding_), tree)


def _triplet_shapes(batch: int, per_role: int, sharding_=None) -> dict:
  """Shapes of :func:`jaxvars.data.splits.item_triplets` for ``batch`` items."""
  ints = lambda: _spec((batch, per_role), jnp.int32, sharding_)
  return {"pos_users": ints(), "pos_negs": ints(), "neg_users": ints(), "neg_pos": ints(),
          "pos_mask": _spec((batch, per_role), jnp.float32, sharding_)}


def plan(config: ml_collections.ConfigDict, *, data=None) -> dict:
  """Compiles every planned step of a run of ``config`` and counts its calls.

  Args:
    config: a joint config (``configs/joint.py``).
    data: its :class:`jaxvars.data.pipeline.RecData` (None: prepared or loaded as a run
      does, from ``config.data``).

  Returns:
    {'steps': [:class:`Step` as a dict], 'totals': {'flops', 'bytes', 'max_memory'},
    'sizes': {'users', 'items', 'train_pairs', 'image_size', 'feature_dim', 'devices'},
    'not_planned': [str], 'backend': str}.

  Raises:
    ConfigError, DataError: as a run's start would.
  """
  from flax.training import train_state
  from jaxvars.attacks.whitebox import attack_loss
  from jaxvars.data import pipeline
  from jaxvars.evaluate import attack_specs, evaluated_systems
  from jaxvars.evaluation.system_features import _systems_pass
  from jaxvars.experiment import build_models, item_split
  from jaxvars.pixels import to_float, to_uint8
  from jaxvars.recommenders import build_recommender
  from jaxvars.recommenders.base import ENCODER_CONSTS
  from jaxvars.attacks.spec import attack_spec
  from jaxvars.training import defense
  from jaxvars.training import recommender as rec_training
  from jaxvars.training.defense_step import (INPUT_KINDS, OTHER_IMAGES, loss_weights,
                                             make_defense_step, needs_other_images,
                                             stage_optimizer)
  configuration.validate(config)
  if config.get("task", "joint") != "joint":
    raise ConfigError(f"config.task={config.task!r}: the planner plans joint runs "
                      "(configs/joint.py)")
  if data is None:
    data = pipeline.load(config.data, None)
  mesh = sharding.make_mesh(config.num_devices)
  repl, on_data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  u, n_items, s = int(data.num_users), int(data.num_items), int(config.data.image_size)
  n_train = int(len(data.train_users))
  models, backbone_vars, params = build_models(config, num_users=u, num_items=n_items,
                                               shapes_only=True)
  f_dim = int(models.backbone.feature_dim)
  consts = {"backbone": backbone_vars,
            "stats": {"mean": _spec((f_dim,), jnp.float32), "std": _spec((f_dim,), jnp.float32)},
            "features": _spec((n_items, f_dim), jnp.float32)}
  photos = lambda b: _spec((b, s, s, 3), jnp.uint8, on_data)
  ints = lambda b: _spec((b,), jnp.int32, on_data)
  key = jax.eval_shape(lambda: jax.random.key(0))
  steps: list[Step] = []

  def add(name, count, fn, *args):
    if count <= 0:
      return
    flops, nbytes, memory, seconds = _cost(fn, *args)
    steps.append(Step(name, float(count), flops, nbytes, memory, seconds))

  # The frozen backbone's feature pass over the clean catalogue (make_consts).
  fb = int(config.backbone.feature_batch_size)
  pooled = jax.jit(lambda v, x: models.backbone.apply(v, to_float(x), train=False)["pooled"])
  add("feature pass (clean catalogue)", math.ceil(n_items / fb), pooled, backbone_vars,
      photos(fb))

  # Every recommender's BPR steps, per training stage.
  main = str(config.recommender.name)
  rec_of, per_epoch = {}, max(1, math.ceil(n_train / int(config.recommender.batch_size)))
  b_rec = int(config.recommender.batch_size)
  for name in families.names(config):
    cfg = config if name == main else families.config_for(config, name)
    rec = build_recommender(cfg.recommender, num_users=u, num_items=n_items, feature_dim=f_dim)
    rec_params = jax.eval_shape(lambda: rec.init(jax.random.key(0), f_dim))
    rec_of[name] = (cfg, rec, rec_params)
    if rec.fitted:
      continue
    tx = rec_training.make_optimizer(cfg.recommender, per_epoch)
    state = jax.eval_shape(lambda p: train_state.TrainState.create(apply_fn=None, params=p,
                                                                   tx=tx), rec_params)
    source = (photos(n_items) if rec.reads_images else consts["features"])
    source = _spec(source.shape, source.dtype)
    batch = {"user": ints(b_rec), "pos": ints(b_rec), "neg": ints(b_rec)}
    for stage in rec.training_stages(cfg.recommender.epochs):
      add(f"recommender {name} ({stage.name})", per_epoch * int(stage.epochs),
          rec_training.make_bpr_step(rec, mesh, stage.terms), state, batch, source)

  # The defence stages, one compiled step per input kind (PGD: see the module docstring).
  _, _, pool, _ = item_split(config, n_items)
  attack = attack_spec(config.attack, "pgd", config.defense.train_eps, objective="bpr")
  pgd_factor = int(attack.steps) + 1
  choices = tuple(config.defense.get("train_eps_choices", ()) or ())
  b_def, per_role = int(config.defense.batch_size), int(config.defense.triplets_per_item)
  bpr_other = config.defense.get("bpr_other", "clean")
  for name in defense.stage_names(config):
    stage = config.stages[name]
    per_epoch_def = min(int(config.defense.items_per_epoch or len(pool)), len(pool))
    total = max(1, per_epoch_def // b_def) * int(stage.epochs)
    weights = loss_weights(config.loss, stage.terms)
    tx = stage_optimizer(tuple(stage.trainable), stage.lr)
    state = jax.eval_shape(lambda p: train_state.TrainState.create(apply_fn=None, params=p,
                                                                   tx=tx), params)
    batch = {"images": photos(b_def), "items": ints(b_def),
             "triplets": _triplet_shapes(b_def, per_role, on_data)}
    if needs_other_images(weights, bpr_other):
      batch[OTHER_IMAGES] = _spec((b_def, 2 * per_role, s, s, 3), jnp.uint8, on_data)
    mix = np.asarray(stage.mix, np.float64) / float(sum(stage.mix))
    cost = {}
    for k, kind in enumerate(INPUT_KINDS[:2]):  # clean, fgsm: PGD from their difference.
      one_hot = tuple(1.0 if j == k else 0.0 for j in range(3))
      if kind == "clean" and not mix[0] and not mix[2]:
        continue
      if kind == "fgsm" and not mix[1] and not mix[2]:
        continue
      fn = make_defense_step(models, mesh, weights=weights, mix=one_hot, attack=attack,
                             eps_choices=choices, temperature=config.detector.temperature,
                             bpr_other=bpr_other)
      cost[kind] = _cost(fn, state, batch, consts, key)
    for k, kind in enumerate(INPUT_KINDS):
      if not mix[k]:
        continue
      if kind == "pgd":  # clean + (k + 1) gradient steps.
        c, f = cost["clean"], cost["fgsm"]
        one = tuple(c[i] + pgd_factor * max(f[i] - c[i], 0.0) for i in range(2))
        flops, nbytes, memory, seconds = one + (max(c[2], f[2]), 0.0)
      else:
        flops, nbytes, memory, seconds = cost[kind]
      steps.append(Step(f"defence {name} ({kind} inputs)", total * float(mix[k]), flops,
                        nbytes, memory, seconds))

  # Each recommender with a visual term: its transfer attacks (FGSM batches, PGD as
  # steps + 1 of them) and the systems' feature pass over every condition's catalogue.
  specs = attack_specs(config)
  b_att = int(config.attack.batch_size)
  systems = evaluated_systems(config)
  frozen = ml_collections.FrozenConfigDict(config)
  for name, (cfg, rec, rec_params) in rec_of.items():
    if not rec.uses_features or not specs:
      continue
    ms = dataclasses.replace(models, recommender=rec)
    c = dict(consts)
    if rec.reads_images:
      c[ENCODER_CONSTS] = rec_params
      c["features"] = jax.eval_shape(lambda p: rec.encode(p, jnp.zeros((1, s, s, 3))),
                                     rec_params)
      c["features"] = _spec((n_items, c["features"].shape[-1]), jnp.float32)
    p = dict(params, recommender=rec_params)
    fgsm = attack_spec(cfg.attack, "fgsm", float(specs[0].eps))

    def craft(p, c, batch, spec=fgsm, ms=ms, cfg=cfg):
      loss_fn, stochastic = attack_loss(
          spec, models=ms, params=p, consts=c, config=cfg, items=batch["items"],
          inputs={k: batch[k] for k in batch if k not in ("images", "items")},
          num_users=u)
      adv = spec.run_loss(loss_fn, to_float(batch["images"]), jax.random.key(0),
                          stochastic=stochastic)
      return to_uint8(adv)

    batch = {"images": photos(b_att), "items": ints(b_att),
             **_triplet_shapes(b_att, int(cfg.attack.triplets_per_item), on_data)}
    batches = math.ceil(n_items / b_att)
    n_grad = sum(sp.gradient_batches for sp in specs)
    add(f"FGSM batch against {name} (PGD-k as k + 1)", batches * n_grad, jax.jit(craft),
        p, c, batch)
    names = tuple(systems) if name == main else tuple(
        x for x in systems if x in families.TABLE_SYSTEMS)
    if rec.reads_images or not rec.uses_features:
      names = tuple(x for x in names if x in families.TABLE_SYSTEMS)

    def systems_pass(p, c, batch, names=names, ms=ms):
      return _systems_pass(p, c, batch, names=names, models=ms, config=frozen,
                           seed=int(config.seed), draws=int(config.eval.rand_draws))

    add(f"systems feature pass for {name} ({', '.join(names)})",
        batches * (1 + len(specs)), jax.jit(systems_pass), p, c,
        {"images": photos(b_att), "items": ints(b_att)})
    if name == main:
      _plan_whitebox(add, config, cfg, craft, p, c, batch, n_items)

  totals = {"flops": sum(st.flops * st.count for st in steps),
            "bytes": sum(st.bytes * st.count for st in steps),
            "max_memory": max((st.memory for st in steps), default=0.0)}
  catalogue = float(n_items) * s * s * 3
  return {"steps": [dataclasses.asdict(st) for st in steps], "totals": totals,
          "sizes": {"users": u, "items": n_items, "train_pairs": n_train, "image_size": s,
                    "feature_dim": f_dim, "devices": int(mesh.size),
                    "catalogue_bytes": catalogue},
          "not_planned": NOT_PLANNED, "backend": jax.default_backend()}


def _plan_whitebox(add, config, cfg, craft, p, c, batch, n_items: int) -> None:
  """The white-box attacks of ``config.attack.adaptive`` through each defended system: one
  gradient batch through the system (EOT draws included) per PGD step, on the items the
  item-subset attacks perturb (``eval.max_items``), counted for the base attack, its
  detector-aware variants and restarts (the twice-the-steps and eps-64 sanity checks are
  not counted)."""
  from jaxvars.attacks.spec import attack_spec
  from jaxvars.defenses import SYSTEMS, UNDEFENDED
  from jaxvars.evaluate import evaluated_systems
  ad = config.attack.get("adaptive")
  if ad is None or not ad.eps:
    return
  b_att = int(config.attack.batch_size)
  max_items = int(config.eval.max_items) or n_items
  batches = math.ceil(min(max_items, n_items) / b_att)
  systems = evaluated_systems(config)
  variants = 1 + sum(1 for lam in ad.detector_lambdas if lam > 0)
  for target in (t for t in ad.systems if t in systems and t != UNDEFENDED):
    eot = int(ad.eot_samples) if SYSTEMS.get(target).randomized else 1
    for method in ad.methods:
      spec = attack_spec(config.attack, method, float(ad.eps[0]), objective="bpr",
                         through=target, eot=eot, restarts=int(ad.restarts))
      one = dataclasses.replace(attack_spec(config.attack, "fgsm", float(ad.eps[0]),
                                            objective="bpr"), through=target, eot=eot)
      n_grad = spec.gradient_batches * (int(ad.restarts) if method != "cw" else 1)
      add(f"white-box gradient batch through {target}" + (f" (EOT {eot})" if eot > 1 else ""),
          batches * n_grad * variants * len(ad.eps), jax.jit(
              lambda p, c, b, spec=one: craft(p, c, b, spec=spec)), p, c, batch)


NOT_PLANNED = ["the adaptive transfer objectives and the white-box sanity checks "
               "(config.attack.adaptive)",
               "targeted attacks (config.targeted)", "detection scores and fidelity",
               "full-ranking metrics and the bootstrap", "ablation variants (config.ablation)",
               "data preparation, checkpoint and cache I/O"]


def measure_cpu(seconds: float = 1.0) -> Accelerator:
  """This machine as an :class:`Accelerator`: the float32 FLOP/s of a jitted 3x3
  convolution (64 -> 64 channels, 56 x 56, batch 8) timed for about ``seconds``, its
  bandwidth that of a large array copy, and its memory unknown (0)."""
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  x = jnp.ones((8, 56, 56, 64), jnp.float32)
  w = jnp.ones((3, 3, 64, 64), jnp.float32) * 0.01
  conv(x, w).block_until_ready()
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds or n < 3:
    conv(x, w).block_until_ready()
    n += 1
  per = (time.perf_counter() - t) / n
  flops = 2.0 * 8 * 56 * 56 * 64 * 64 * 9 / per
  big = jnp.ones((16 * 2 ** 20,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  copy(big).block_until_ready()
  t = time.perf_counter()
  for _ in range(5):
    copy(big).block_until_ready()
  bandwidth = 2 * big.nbytes * 5 / (time.perf_counter() - t)
  return Accelerator(f"this machine ({jax.devices()[0].device_kind}, measured)", flops, flops,
                     bandwidth, 0.0, measured=True)


def estimate(result: dict, accelerator: Accelerator, *, utilization: float,
             dtype: str = "float32") -> dict:
  """{'seconds', 'fits'} of a :func:`plan` on ``accelerator`` at ``utilization`` (0 < u <=
  1): the roofline time of every step times its count, and whether the largest step's
  device memory fits (None where the accelerator's memory is unknown). A measured
  accelerator (:func:`measure_cpu`) gets FLOPs / its measured FLOP/s per step instead:
  XLA's "bytes accessed" sums every operation's operands and outputs, which a CPU's caches
  mostly serve, so a bandwidth bound from it overstated the CPU preset's steps 2-5x.

  Raises:
    ValueError: a utilisation outside (0, 1].
  """
  if not 0.0 < utilization <= 1.0:
    raise ValueError(f"utilization={utilization!r} must be in (0, 1]")
  peak = accelerator.flops_bf16 if dtype == "bfloat16" else accelerator.flops
  if accelerator.measured:  # Achieved FLOP/s, compute only (see the module docstring).
    per_step = {st["name"]: st["flops"] / peak for st in result["steps"]}
  else:
    per_step = {st["name"]: max(st["flops"] / (peak * utilization),
                                st["bytes"] / (accelerator.bandwidth * utilization))
                for st in result["steps"]}
  seconds = sum(per_step[st["name"]] * st["count"] for st in result["steps"])
  fits = (None if not accelerator.memory
          else bool(result["totals"]["max_memory"] <= accelerator.memory))
  return {"seconds": seconds, "fits": fits,
          "steps_s": {k: v * next(st["count"] for st in result["steps"] if st["name"] == k)
                      for k, v in per_step.items()}}


def format_plan(result: dict, estimates: dict, *, utilization: float) -> str:
  """The planner's tables as text: each step (count, GFLOP and MB per call, device MB),
  then each accelerator's estimated time and whether it fits."""
  z = result["sizes"]
  lines = [f"plan: {z['users']} users, {z['items']} items, {z['train_pairs']} training "
           f"pairs, {z['image_size']} px, feature dim {z['feature_dim']}, {z['devices']} "
           f"device(s), compiled on {result['backend']}; the catalogue is "
           f"{z['catalogue_bytes'] / 1e9:.2f} GB of uint8 photos in host memory", "",
           f"{'step':70s} {'calls':>9s} {'GFLOP/call':>11s} {'MB/call':>9s} {'device MB':>10s}"]
  for st in result["steps"]:
    lines.append(f"{st['name'][:70]:70s} {st['count']:9.0f} {st['flops'] / 1e9:11.2f} "
                 f"{st['bytes'] / 1e6:9.1f} {st['memory'] / 1e6:10.1f}")
  t = result["totals"]
  lines += [f"{'total':70s} {'':9s} {t['flops'] / 1e12:9.2f} TF {t['bytes'] / 1e12:7.2f} TB "
            f"{t['max_memory'] / 1e6:10.1f}", "",
            f"estimated wall time of the planned steps at utilisation {utilization:g} "
            "(roofline: max(FLOPs / peak, bytes / bandwidth) per step):"]
  for key, (acc, est) in estimates.items():
    fits = {None: "memory unknown", True: "fits", False: "does NOT fit"}[est["fits"]]
    if acc.measured:
      fits = f"compute only, at {acc.flops / 1e9:.1f} GFLOP/s measured now; {fits}"
    lines.append(f"  {key:8s} {acc.name:40s} {est['seconds'] / 60:9.2f} min  ({fits}: "
                 f"{t['max_memory'] / 1e9:.2f} GB of {acc.memory / 1e9:.0f} GB)"
                 if acc.memory else
                 f"  {key:8s} {acc.name:40s} {est['seconds'] / 60:9.2f} min  ({fits})")
  lines += ["", "not planned: " + "; ".join(result["not_planned"]) + "."]
  return "\n".join(lines)


def plan_and_estimate(config, *, accelerators=("cpu",) + tuple(ACCELERATORS),
                      utilization: float = DEFAULT_UTILIZATION, data=None) -> dict:
  """:func:`plan`, then :func:`estimate` on each named accelerator ('cpu': this machine,
  :func:`measure_cpu`).

  Returns:
    the plan with 'utilization', 'accelerators' {key: {'name', 'flops', 'bandwidth',
    'memory'}} and 'estimates' {key: {'seconds', 'fits', 'steps_s'}}, and 'text' (the
    tables, :func:`format_plan`).

  Raises:
    ConfigError: an unknown accelerator name.
  """
  unknown = [a for a in accelerators if a != "cpu" and a not in ACCELERATORS]
  if unknown:
    raise ConfigError(f"--accelerators: {unknown} unknown; expected 'cpu' or one of "
                      f"{sorted(ACCELERATORS)}")
  result = plan(config, data=data)
  accs = {a: measure_cpu() if a == "cpu" else ACCELERATORS[a] for a in accelerators}
  ests = {a: estimate(result, acc, utilization=utilization) for a, acc in accs.items()}
  result.update(utilization=utilization,
                accelerators={a: dataclasses.asdict(acc) for a, acc in accs.items()},
                estimates=ests, text=format_plan(result, {a: (accs[a], ests[a]) for a in accs},
                                                  utilization=utilization))
  return result


def main(argv):
  del argv
  from absl import flags
  from ml_collections import config_flags  # noqa: F401  (the flag is defined below)
  from jaxvars import atomic
  cfg = flags.FLAGS.config
  accs = tuple(a.strip() for a in flags.FLAGS.accelerators.split(",") if a.strip())
  result = plan_and_estimate(cfg, accelerators=accs, utilization=flags.FLAGS.utilization)
  print(result["text"])
  if flags.FLAGS.out:
    atomic.write_json(flags.FLAGS.out, {k: v for k, v in result.items() if k != "text"})
    print(f"\nplan written to {flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A joint config, e.g. configs/joint.py:cpu.",
                                  lock_config=True)
  flags.DEFINE_string("accelerators", ",".join(("cpu",) + tuple(ACCELERATORS)),
                      "Comma-separated: 'cpu' (this machine, measured) and any of "
                      + ", ".join(ACCELERATORS) + ".")
  flags.DEFINE_float("utilization", DEFAULT_UTILIZATION, "Fraction of peak FLOP/s and "
                     "bandwidth assumed reached (0-1].")
  flags.DEFINE_string("out", "", "Write the plan as JSON to this file.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
