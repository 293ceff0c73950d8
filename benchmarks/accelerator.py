"""The accelerator benchmark (issue 36 item 7): throughput and model FLOP utilisation (MFU)
of the feature pass, FGSM, PGD-k and the joint defence step, per backbone and dtype.

  python benchmarks/accelerator.py --out=results/accelerator_h100.json     # on a GPU/TPU VM
  python benchmarks/accelerator.py --small --out=/tmp/accelerator_cpu.json  # CPU, tiny shapes
  python benchmarks/accelerator.py --compile_only                           # FLOPs only, no run

For each backbone of ``--backbones`` (default ResNet-50 and EfficientNet-Lite0, on **random
weights**: the weights do not change the time) and each compute dtype of ``--dtypes``
(``config.dtype``: float32 and bfloat16; parameters float32 in both), at ``--image_size``
(224) on one device:

* ``features``: the frozen backbone's feature pass f(x) of ``--batch`` uint8 photos
  (normalised pooled features, as the catalogue's feature pass computes them), images/s;
* ``fgsm``: one FGSM batch of ``--batch`` photos against a random VBPR (the paper's BPR
  objective, eps 8, 8-bit output), images/s;
* ``pgd``: PGD-``--pgd_steps`` (default 10, random start, best iterate) on the same
  objective, images/s;
* ``joint/clean``, ``joint/fgsm``, ``joint/pgd``: the joint defence stage's step
  (``configs/joint.py``'s ``stages.joint``: content + perceptual + contrastive + BPR,
  denoiser and detector trained, inputs crafted inside the step) at ``--defense_batch``
  items, one compiled step per input kind, items/s; and ``joint``: the stage's expected
  step under its (clean, fgsm, pgd) mix (1:1:1), time and FLOPs averaged over the kinds.
  The denoiser is the paper preset's (64 channels, 9 residual blocks, attention over 8x8
  patches), on random weights.

Each measure is compiled ahead of time (``jit(...).lower(...).compile()``; its seconds are
``compile_s``), run once untimed, then ``--repeats`` times with ``block_until_ready``; the
median is reported (and every repeat is in the JSON). Its FLOPs per call are XLA's cost
analysis of that compiled executable (``flops_xla``), except where XLA keeps PGD's loop as
a while loop (every backend but the CPU, where ``jaxvars.attacks.linf.pgd`` unrolls it):
XLA's cost analysis counts a loop's body once, so PGD's FLOPs are then ``flops_derived``:
``k x FLOPs(FGSM batch) + FLOPs(feature pass)`` (k gradient steps, then the loss of the last
iterate), and the PGD step of the defence ``FLOPs(clean step) + k x (FLOPs(FGSM step) -
FLOPs(clean step)) + FLOPs(feature pass) x defense_batch / batch``. On the CPU both are
recorded and ``tests/test_benchmarks.py`` checks that they agree. Achieved FLOP/s = FLOPs
per call / median seconds; MFU = achieved / the device's peak for the dtype
(``jaxvars.planner.ACCELERATORS``: the vendors' dense peaks; float32 at the TF32 rate on
GPUs, XLA's default there, and at the bf16 rate on TPUs), the accelerator picked from
``jax.devices()[0].device_kind`` (``jaxvars.planner.accelerator_for``) or named with
``--peak``. Where the device is not in the
table (a CPU, an H100 PCIe, ...) MFU is 'n/a' unless ``--peak`` gives one. "Model FLOPs"
here are the FLOPs XLA counts for the program as compiled, the recomputation and
bookkeeping of the attack included; they are not a hand count of the model's arithmetic.

Prints a table and writes JSON (``--out``): the device kind, the jax version, the flags,
the code version (``jaxvars.provenance.describe``) and every row.

Budget at the defaults (both backbones, both dtypes, batch 128, defence batch 32, PGD-10,
5 repeats): meant to finish in under 5 minutes on one H100, an estimate NOT verified on a
GPU (none was available when this was written). From ``--compile_only`` on a CPU at the
default shapes (docs/performance.md), one call of each ResNet-50 measure is 76 TFLOP in all
(PGD-10 22, the three joint steps 51) and of EfficientNet-Lite0's 44 TFLOP (the paper-size
denoiser dominates the joint step); the timed calls (1 warm-up + 5 repeats) of all 24
programs come to about 1.4 PFLOP, 9-22 s on an H100 at an MFU of 10-25%. The rest is
compiling the 24 programs: under 5 minutes needs them compiled in under about 10 s each on
average (on this 2-core CPU at LLVM -O0 they took 1-45 s each). ``total_s`` in the JSON
records what it took; cut ``--backbones``, ``--dtypes`` or ``--measures`` where it runs long.
"""

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import joint  # noqa: E402
from jaxvars import planner, provenance, sharding  # noqa: E402
from jaxvars.attacks.spec import attack_spec  # noqa: E402
from jaxvars.experiment import build_models  # noqa: E402
from jaxvars.pixels import to_float, to_uint8  # noqa: E402
from jaxvars.training.defense_step import (INPUT_KINDS, loss_weights,  # noqa: E402
                                           make_defense_step, stage_optimizer)

_BACKBONES = flags.DEFINE_list("backbones", ["resnet50", "efficientnet_lite0"],
                               "Registered backbones (random weights).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (config.dtype).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side (px).")
_BATCH = flags.DEFINE_integer("batch", 128, "Photos per feature pass / FGSM / PGD call.")
_DEFENSE_BATCH = flags.DEFINE_integer("defense_batch", 32, "Items per joint defence step "
                                      "(the paper preset's config.defense.batch_size).")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 10, "PGD iterations (the attack's and the "
                                  "defence step's PGD inputs').")
_WIDTH = flags.DEFINE_integer("width", 64, "ResNets' first-stage channels (64: the standard "
                              "network; EfficientNet-Lite0 ignores it).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measure (median reported).")
_MEASURES = flags.DEFINE_list("measures", ["features", "fgsm", "pgd", "joint"],
                              "Which of features, fgsm, pgd, joint to run.")
_JOINT_KINDS = flags.DEFINE_list("joint_kinds", list(INPUT_KINDS),
                                 "Input kinds of the joint step to time (clean, fgsm, pgd).")
_PEAK = flags.DEFINE_string(
    "peak", "", "The peak FLOP/s for MFU: '' = from the device kind (jaxvars.planner."
    "ACCELERATORS); a key of ACCELERATORS (h100, h200, a100, tpu_v4, tpu_v5e, tpu_v5p); "
    "'cpu' = this machine's measured convolution rate (planner.measure_cpu; not a peak); or "
    "'F32[,BF16]' in FLOP/s, e.g. 494.7e12,989.4e12.")
_SMALL = flags.DEFINE_bool(
    "small", False, "CPU test shapes: 32 px, batch 4, defence batch 4, PGD-2, 2 repeats, a "
    "tiny denoiser and detector head (flags given explicitly still win).")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile and report FLOPs per call, without running.")
_OUT = flags.DEFINE_string("out", "accelerator.json", "JSON output path ('' = none).")

# --small: values of the flags above (unless given on the command line) and of the denoiser
# and detector head (tiny_preset's).
SMALL = {"image_size": 32, "batch": 4, "defense_batch": 4, "pgd_steps": 2, "repeats": 2}
SMALL_DENOISER = {"channels": 4, "num_blocks": 2, "attn_dim": 16, "heads": 2, "patch": 8}
SMALL_HEAD = {"hidden": 16, "dim": 8}
NUM_USERS, NUM_ITEMS = 400, 600


def _value(flag):
  """A flag's value, or --small's where --small is set and the flag was not given."""
  if _SMALL.value and flag.name in SMALL and not flags.FLAGS[flag.name].present:
    return SMALL[flag.name]
  return flag.value


def peaks(spec: str, device_kind: str) -> tuple[str, dict]:
  """(description, {dtype: peak FLOP/s or None}) from ``--peak`` and the device kind."""
  if spec == "cpu":
    acc = planner.measure_cpu()
    return acc.name + " (achieved convolution rate, not a peak)", {
        "float32": acc.flops, "bfloat16": acc.flops}
  if spec and spec in planner.ACCELERATORS:
    key = spec
  elif spec:
    values = [float(v) for v in spec.split(",")]
    if len(values) not in (1, 2) or min(values) <= 0:
      raise app.UsageError(f"--peak={spec!r}: expected F32[,BF16] FLOP/s or one of "
                           f"{sorted(planner.ACCELERATORS)} or 'cpu'")
    return f"--peak={spec}", {"float32": values[0], "bfloat16": values[-1]}
  else:
    key = planner.accelerator_for(device_kind)
  if key is None:
    return f"{device_kind}: no peak known (pass --peak)", {"float32": None, "bfloat16": None}
  acc = planner.ACCELERATORS[key]
  return acc.name, {"float32": acc.flops, "bfloat16": acc.flops_bf16}


def _compile(fn, *args) -> tuple:
  """(compiled executable, {'flops_xla', 'bytes_accessed', 'device_memory', 'compile_s'})."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t
  flops, nbytes, memory = planner.cost_of(compiled)
  return compiled, {"flops_xla": flops, "bytes_accessed": nbytes, "device_memory": memory,
                    "compile_s": seconds}


def _time(call, repeats: int) -> list[float]:
  """Seconds of ``repeats`` calls of ``call()`` (which blocks), after one untimed call."""
  call()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    call()
    out.append(time.perf_counter() - t)
  return out


def _config(arch: str, dtype: str, *, small: bool):
  config = joint.get_config("")  # The paper preset: its denoiser, detector, loss, stages.
  config.backbone.arch = arch
  config.backbone.init = "random"
  config.backbone.width = _WIDTH.value
  config.dtype = dtype
  config.data.image_size = _value(_IMAGE_SIZE)
  config.attack.pgd_steps = _value(_PGD_STEPS)
  config.attack.batch_size = _value(_BATCH)
  config.defense.batch_size = _value(_DEFENSE_BATCH)
  if small:
    config.denoiser.update(SMALL_DENOISER)
    config.detector.update(SMALL_HEAD)
  return config


def random_like(shapes, rng):
  """Random values of the shapes of a variables tree, drawn on the host with numpy: kernels
  and embeddings normal with std 1/sqrt(fan in), BatchNorm/LayerNorm scales and running
  variances 1, biases and running means 0, anything else normal with std 0.01. Not the
  library's initialisers (XLA's CPU backend takes 15-20 s to compile one jitted
  ``Module.init`` of a backbone, which the CPU test cannot afford); the values do not change
  what the programs compute or their time."""
  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    shape = tuple(leaf.shape)
    if name in ("scale", "var"):
      value = np.ones(shape)
    elif name in ("bias", "mean"):
      value = np.zeros(shape)
    elif name in ("kernel", "embedding") and len(shape) >= 2:
      value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    else:
      value = 0.01 * rng.standard_normal(shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _triplets(rng, b: int, per_role: int) -> dict:
  ints = lambda n: rng.integers(0, n, (b, per_role)).astype(np.int32)
  return {"pos_users": ints(NUM_USERS), "pos_negs": ints(NUM_ITEMS),
          "neg_users": ints(NUM_USERS), "neg_pos": ints(NUM_ITEMS),
          "pos_mask": np.ones((b, per_role), np.float32)}


def _finish_row(row: dict, peak: float | None) -> dict:
  row["peak_flop_per_s"] = peak
  row["mfu"] = row["flop_per_s"] / peak if peak and "flop_per_s" in row else "n/a"
  _print_row(row)
  return row


def run_backbone(arch: str, dtype: str, *, repeats: int, compile_only: bool,
                 peak: float | None) -> list[dict]:
  """The rows of one backbone and dtype (see the module docstring); ``peak``: the device's
  peak FLOP/s in ``dtype`` (None: unknown, MFU 'n/a')."""
  from flax.training.train_state import TrainState
  config = _config(arch, dtype, small=_SMALL.value)
  s, b = int(config.data.image_size), int(config.attack.batch_size)
  b_def, k = int(config.defense.batch_size), int(config.attack.pgd_steps)
  models, backbone_vars, params = build_models(config, num_users=NUM_USERS, num_items=NUM_ITEMS,
                                               shapes_only=True)
  rng = np.random.default_rng(0)
  backbone_vars, params = random_like(backbone_vars, rng), random_like(params, rng)
  f_dim = int(models.backbone.feature_dim)
  mesh = sharding.make_mesh(1)
  repl = sharding.replicated(mesh)
  consts = jax.device_put({
      "backbone": backbone_vars,
      "stats": {"mean": jnp.zeros((f_dim,)), "std": jnp.ones((f_dim,))},
      "features": jnp.asarray(rng.standard_normal((NUM_ITEMS, f_dim)), jnp.float32)}, repl)
  params = jax.device_put(params, repl)
  photos = lambda n: rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
  items = lambda n: rng.choice(NUM_ITEMS, n, replace=False).astype(np.int32)
  rows, flops_of = [], {}

  def record(what, unit, batch, compiled, info, call, flops=None, derived=None):
    row = {"backbone": arch, "dtype": dtype, "measure": what, "unit": unit, "batch": batch,
           "image_size": s, "pgd_steps": k if what in ("pgd", "joint/pgd") else None, **info,
           "flops_derived": derived}
    row["flops"] = info["flops_xla"] if flops is None else flops
    row["flops_source"] = "xla" if flops is None else "derived"
    if not compile_only:
      times = _time(call, repeats)
      row.update(seconds=statistics.median(times), seconds_all=times)
      row["per_s"] = batch / row["seconds"]
      row["flop_per_s"] = row["flops"] / row["seconds"]
    rows.append(_finish_row(row, peak))
    flops_of[what] = row

  measures = set(_MEASURES.value)
  x = jax.device_put(photos(b), sharding.batch_sharding(mesh))
  # The feature pass (also the loss forward of PGD's derived FLOPs).
  feats = jax.jit(lambda c, im: models.features(c, to_float(im)))
  compiled, info = _compile(feats, consts, x)
  record("features", "images/s", b, compiled, info,
         lambda: jax.block_until_ready(compiled(consts, x)))

  unrolled = jax.default_backend() == "cpu"  # jaxvars.attacks.linf.pgd's unroll=None.
  if measures & {"fgsm", "pgd"}:
    trip = jax.device_put(_triplets(rng, b, int(config.attack.triplets_per_item)),
                          sharding.batch_sharding(mesh))
    it = jax.device_put(items(b), sharding.batch_sharding(mesh))
    key = jax.random.key(1)
    for method in ("fgsm", "pgd"):
      if method not in measures and not (method == "fgsm" and "pgd" in measures):
        continue
      spec = attack_spec(config.attack, method, 8.0, objective="bpr")
      fn = jax.jit(lambda r, c, im, i, t, kk, spec=spec: to_uint8(spec.run(
          models.attack_context(r, c, i, t), to_float(im), kk)))
      args = (params["recommender"], consts, x, it, trip, key)
      compiled, info = _compile(fn, *args)
      flops = derived = None
      if method == "pgd":
        derived = k * flops_of["fgsm"]["flops"] + flops_of["features"]["flops"]
        flops = None if unrolled else derived
      record(method, "images/s", b, compiled, info,
             lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args)),
             flops=flops, derived=derived)

  if "joint" in measures:
    stage = config.stages.joint
    weights = loss_weights(config.loss, stage.terms)
    attack = attack_spec(config.attack, "pgd", config.defense.train_eps, objective="bpr")
    host = {"images": photos(b_def), "items": items(b_def),
            "triplets": _triplets(rng, b_def, int(config.defense.triplets_per_item))}
    batch = sharding.shard_batch(host, mesh)
    tx = stage_optimizer(tuple(stage.trainable), stage.lr)
    kinds = [kd for kd in INPUT_KINDS if kd in _JOINT_KINDS.value]
    if "pgd" in kinds and not unrolled:  # Its derived FLOPs need the other two.
      kinds = list(dict.fromkeys(["clean", "fgsm"] + kinds))
    kinds = [kd for kd in INPUT_KINDS if kd in kinds]
    for kind in kinds:
      n = INPUT_KINDS.index(kind)
      mix = tuple(int(i == n) for i in range(3))
      step = make_defense_step(models, mesh, weights=weights, mix=mix, attack=attack,
                               temperature=config.detector.temperature)
      # A copy of the parameters per step: the step donates its state.
      state = [jax.device_put(TrainState.create(
          apply_fn=None, params=jax.tree.map(jnp.copy, params), tx=tx), repl)]
      args = (state[0], batch, consts, jax.random.key(0))
      compiled, info = _compile(step, *args)

      def call(compiled=compiled, state=state):
        state[0], m = compiled(state[0], batch, consts, jax.random.key(2))
        jax.block_until_ready((state[0], m))

      flops = derived = None
      if kind == "pgd" and "joint/fgsm" in flops_of:
        clean, fgsm_ = flops_of["joint/clean"]["flops"], flops_of["joint/fgsm"]["flops"]
        derived = (clean + k * max(fgsm_ - clean, 0.0)
                   + flops_of["features"]["flops"] * b_def / b)
        flops = None if unrolled else derived
      record(f"joint/{kind}", "items/s", b_def, compiled, info, call, flops=flops,
             derived=derived)
    mix = np.asarray(stage.mix, np.float64) / float(sum(stage.mix))
    parts = [(p, flops_of.get(f"joint/{kd}")) for p, kd in zip(mix, INPUT_KINDS) if p]
    if all(r is not None for _, r in parts):  # The stage's expected step under its mix.
      row = {"backbone": arch, "dtype": dtype, "measure": "joint", "unit": "items/s",
             "batch": b_def, "image_size": s, "mix": [float(p) for p in mix],
             "flops": sum(p * r["flops"] for p, r in parts), "flops_source": "mix",
             "compile_s": sum(r["compile_s"] for _, r in parts),
             "device_memory": max(r["device_memory"] for _, r in parts)}
      if not compile_only:
        row["seconds"] = sum(p * r["seconds"] for p, r in parts)
        row["per_s"] = b_def / row["seconds"]
        row["flop_per_s"] = row["flops"] / row["seconds"]
      rows.append(_finish_row(row, peak))
  return rows


HEADER = (f"{'backbone':19} {'dtype':8} {'measure':12} {'batch':>5} {'ms/call':>9} "
          f"{'per s':>9} {'unit':8} {'GFLOP/call':>11} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'compile s':>9}")


def _print_row(row: dict) -> None:
  ms = f"{row['seconds'] * 1e3:9.1f}" if "seconds" in row else f"{'-':>9}"
  per = f"{row['per_s']:9.1f}" if "per_s" in row else f"{'-':>9}"
  tf = f"{row['flop_per_s'] / 1e12:8.3f}" if "flop_per_s" in row else f"{'-':>8}"
  mfu = row.get("mfu")
  mfu = f"{mfu * 100:5.1f}%" if isinstance(mfu, float) else f"{'n/a':>6}"
  flops = f"{row['flops'] / 1e9:11.2f}" + ("*" if row.get("flops_source") == "derived" else " ")
  name = f"pgd-{row['pgd_steps']}" if row["measure"] == "pgd" else row["measure"]
  print(f"{row['backbone']:19} {row['dtype']:8} {name:12} {row['batch']:5d} {ms} "
        f"{per} {row['unit']:8} {flops:>11} {tf} {mfu} {row['compile_s']:9.1f}", flush=True)


def main(argv):
  del argv
  t0 = time.perf_counter()
  device = jax.devices()[0]
  for dtype in _DTYPES.value:
    if dtype not in ("float32", "bfloat16"):
      raise app.UsageError(f"--dtypes: {dtype!r} is not float32 or bfloat16")
  unknown = set(_MEASURES.value) - {"features", "fgsm", "pgd", "joint"}
  if unknown:
    raise app.UsageError(f"--measures: unknown {sorted(unknown)}")
  peak_name, peak = peaks(_PEAK.value, device.device_kind)
  repeats = _value(_REPEATS)
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; peak: {peak_name}; "
        f"{_value(_IMAGE_SIZE)} px, batch {_value(_BATCH)}, defence batch "
        f"{_value(_DEFENSE_BATCH)}, PGD-{_value(_PGD_STEPS)}, median of {repeats}; "
        "random weights" + ("; --small" if _SMALL.value else ""))
  print(HEADER)
  rows = []
  for arch in _BACKBONES.value:
    for dtype in _DTYPES.value:
      rows += run_backbone(arch, dtype, repeats=repeats, compile_only=_COMPILE_ONLY.value,
                           peak=peak[dtype])
  print("* FLOPs derived from XLA's counts of the FGSM and clean programs (PGD's while loop; "
        "see the module docstring)")
  # XLA counts every element-wise operation, the casts to and from bfloat16 included, so a
  # bfloat16 program counts more FLOPs than the same model in float32 (EfficientNet's
  # feature pass: about 30% more). MFU at the float32 program's count, the same model's
  # FLOPs in both dtypes, next to it:
  f32 = {(r["backbone"], r["measure"]): r for r in rows if r["dtype"] == "float32"}
  for row in rows:
    ref = f32.get((row["backbone"], row["measure"]))
    if row["dtype"] == "bfloat16" and ref is not None and "seconds" in row:
      row["flops_float32_program"] = ref["flops"]
      row["mfu_at_float32_flops"] = (ref["flops"] / row["seconds"] / row["peak_flop_per_s"]
                                     if row["peak_flop_per_s"] else "n/a")
  total = time.perf_counter() - t0
  print(f"total {total:.1f} s")
  out = {"device_kind": device.device_kind, "platform": device.platform,
         "jax": jax.__version__, "peak": peak_name, "peak_flop_per_s": peak,
         "weights": "random", "small": _SMALL.value, "compile_only": _COMPILE_ONLY.value,
         "flags": {"image_size": _value(_IMAGE_SIZE), "batch": _value(_BATCH),
                   "defense_batch": _value(_DEFENSE_BATCH), "pgd_steps": _value(_PGD_STEPS),
                   "repeats": repeats, "width": _WIDTH.value, "backbones": _BACKBONES.value, "dtypes": _DTYPES.value,
                   "measures": _MEASURES.value, "joint_kinds": _JOINT_KINDS.value,
                   "peak": _PEAK.value},
         "total_s": total, "rows": rows, "provenance": provenance.describe()}
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
