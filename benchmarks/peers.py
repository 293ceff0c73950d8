"""jaxvars against its PyTorch peers, in one process, on the CPU.

  python benchmarks/peers.py --out=/tmp/peers.json                    # all parts, 5 repetitions
  python benchmarks/peers.py --quick --repeats=1 --out=/tmp/peers_quick.json   # smoke test
  python benchmarks/peers.py --parts=a --rows=resnet18@64,resnet50@224 --out=/tmp/peers_a.json

Needs the ``bench`` extra (``pip install -e '.[bench]'``: torch, ART, Cornac); the torch
side is benchmarks/peers_torch.py. Every timing is the minimum over ``--repeats``
interleaved repetitions (each repetition runs every contender once, in turn, so drifts in
machine load hit all of them), after one warm-up call (compilation) that is not timed.

(a) Item-feature pass and PGD-5 (eps 8/255, step 2/255, random start, cross-entropy of a
    1000-way linear head on the pooled feature, eval-mode BatchNorm), images/s: jaxvars
    (jitted ``model.apply`` / ``jaxvars.attacks.pgd``), jaxvars with ``jaxvars.layers``'
    CPU convolution forms off (``SMALL_MAP_MAX_SIDE = 0`` and no depthwise shift-and-add
    while tracing: every convolution XLA's own, to show what layers.py buys), a
    hand-written PyTorch loop and ART's ``ProjectedGradientDescent`` on a
    ``PyTorchClassifier``; ResNet-18 (width 64, standard stem) at 32/64/128 px, ResNet-50
    at 224 px (batch 8) and EfficientNet-Lite0 at 128/224 px. The jax model is initialised
    at random (BatchNorm scales and biases random, statistics those of a random batch) and
    the same numbers are loaded into the torch reference nets of tests/ (checked: max
    |pooled_jax - pooled_torch|). Also checks
    that every attack's output is in the eps-ball and [0, 1] and how many labels it flips.
(b) VBPR on the H&M sample (--hm_dir; skipped where absent): jaxvars'
    ``train_recommender`` against ``cornac.models.VBPR``, He form, K = K' = 64 (Cornac's k
    and k2), the same initial parameters, learning rate, Adam and matched L2 weights;
    s/epoch and HR@10 over the same candidates (test item + 100 negatives, ties against
    the positive). jaxvars' s/epoch is measured between the ends of epochs 1 and N (the
    one-off compilation and the last checkpoint write excluded); Cornac's is fit time / N.
(c) The joint defence step (configs/joint.py ``cpu`` preset sizes, mix 1:1:1, all four
    loss terms), the BPR epoch step and the feature pass on 1/2/4/8 simulated CPU devices
    (``--xla_force_host_platform_device_count=8``, set below unless XLA_FLAGS sets a count;
    in a child process when other parts run too).

Parts (a) and (b) run on one device (``config.num_devices = 1``) in a process without
simulated devices, and every jax program uses all cores; torch gets
``torch.set_num_threads(os.cpu_count())`` (``--torch_threads``). Measure on a quiet
machine: where other work holds a core, torch's OpenMP barriers stall (a 2-thread torch
then runs tens of times slower than a 1-thread one) and jax slows down too. Simulated
devices slow single-device jax programs down (the VBPR epoch of part (b) most), hence part
(c)'s own process.
"""

import os
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _parts_from_argv(argv) -> list[str]:
  """``--parts`` as given on the command line (read before jax starts; default a,b,c)."""
  parts = "a,b,c"
  for i, arg in enumerate(argv):
    if arg.startswith("--parts="):
      parts = arg.split("=", 1)[1]
    elif arg == "--parts" and i + 1 < len(argv):
      parts = argv[i + 1]
  return [p for p in parts.split(",") if p]


# Simulated devices slow single-device programs (the VBPR epoch of part (b) most), so
# only a process that runs part (c) alone asks for 8; a run of several parts
# times (a) and (b) on one device and starts (c) in a child process (main()).
if _parts_from_argv(sys.argv[1:]) == ["c"] and _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_COUNT_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # The peers run on the CPU: so does jax here.

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peers_torch.

from jaxvars import layers, provenance  # noqa: E402

_OUT = flags.DEFINE_string("out", "peers.json", "JSON output path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timed repetitions (minimum reported).")
_PARTS = flags.DEFINE_list("parts", ["a", "b", "c"], "Parts to run: a (feature pass, PGD), "
                           "b (VBPR vs Cornac), c (defence step, device scaling).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes, for a smoke test of every code path.")
_HM_DIR = flags.DEFINE_string("hm_dir", os.path.join(REPO, "..", "shared", "data", "hm"),
                              "H&M sample (Kaggle layout) of part (b).")
_TFDS_DIR = flags.DEFINE_string(
    "tfds_dir", os.path.join(os.path.expanduser("~"), ".cache", "jaxvars_peers_tfds"),
    "Where part (b) prepares the H&M dataset (kept: later runs reuse it).")
_ROWS = flags.DEFINE_list("rows", [], "Part (a) rows to run, as arch@px (e.g. resnet18@64); "
                          "empty = all of the full or --quick list.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads (0 = os.cpu_count()). On a machine where other "
    "work holds cores, torch's OpenMP barriers stall (tens of times slower): measure on a "
    "quiet machine, or check with 1.")

EPS, ALPHA, STEPS = 8.0, 2.0, 5  # PGD of the CPU presets, 1/255 units.
# (arch, image side, batch) of part (a).
ROWS_A = (("resnet18", 32, 32), ("resnet18", 64, 32), ("resnet18", 128, 32),
          ("resnet50", 224, 8), ("efficientnet_lite0", 32, 32), ("efficientnet_lite0", 64, 32),
          ("efficientnet_lite0", 96, 32), ("efficientnet_lite0", 128, 32),
          ("efficientnet_lite0", 224, 32))  # The CPU presets: 96 px (cpu, cpu,hm), 64 px (the
# quick start, cpu synthetic), 32 px (cpu,hm,full).
QUICK_ROWS_A = (("resnet18", 32, 4), ("resnet50", 32, 2), ("efficientnet_lite0", 32, 2))
SETTINGS_B = ((20, 1024), (10, 128))  # (epochs, batch) of part (b).
QUICK_SETTINGS_B = ((3, 1024), (3, 128))
DEVICES_C = (1, 2, 4, 8)


class Skip(Exception):
  """A row or part that cannot run here; the message says why."""


def interleaved(fns: dict, repeats: int):
  """Calls every ``fn`` once (warm-up: compilation), then ``repeats`` rounds of every fn
  in turn. Each fn must return only when its work is done (block_until_ready).

  Returns:
    ({name: minimum seconds}, {name: the last output}).
  """
  outs = {name: fn() for name, fn in fns.items()}
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      outs[name] = fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best, outs


@contextlib.contextmanager
def plain_xla_convs():
  """``jaxvars.layers``' CPU forms off while tracing (both are chosen at trace time):
  ``SMALL_MAP_MAX_SIDE = 0`` (no patches + matmul for small maps) and
  ``DEPTHWISE_SHIFT_ADD = False`` (no shift-and-add for depthwise convolutions). Every
  convolution is then XLA's own."""
  saved = layers.SMALL_MAP_MAX_SIDE, layers.DEPTHWISE_SHIFT_ADD
  layers.SMALL_MAP_MAX_SIDE, layers.DEPTHWISE_SHIFT_ADD = 0, False
  try:
    yield
  finally:
    layers.SMALL_MAP_MAX_SIDE, layers.DEPTHWISE_SHIFT_ADD = saved


def _compile(fn, *args):
  """AOT-compiles ``jax.jit(fn)`` for ``args``: (compiled, seconds, StableHLO text). A
  compiled executable keeps the form it was traced with, whatever the module constants
  are later."""
  t = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t, lowered.as_text()


# ------------------------------------------------------------------------------------------
# (a) Feature pass and PGD.


def _randomise_norms(variables, rng: np.random.Generator):
  """Random BatchNorm scales U(0.5, 1.5) and biases U(-0.3, 0.3) (a fresh init's 1 and 0
  would hide a scale/bias mix-up in the weight transfer); the running statistics are set
  by ``peers_torch.calibrate_norms`` afterwards."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  out = {}
  for path, leaf in flat.items():
    leaf = np.asarray(leaf, np.float32)
    collection, *modules, name = path
    if collection == "params" and (collection, *modules, "scale") in flat:
      lo, hi = {"scale": (0.5, 1.5), "bias": (-0.3, 0.3)}[name]
      leaf = rng.uniform(lo, hi, leaf.shape).astype(np.float32)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


def _set_stats(variables, name_fn, stats: dict):
  """``variables`` with every batch_stats leaf replaced by ``stats[torch name]``."""
  def leaf(keypath, value):
    collection, *path = (getattr(k, "key", getattr(k, "name", str(k))) for k in keypath)
    if collection != "batch_stats":
      return value
    return np.asarray(stats[name_fn(collection, tuple(path))], np.float32).reshape(value.shape)
  return jax.tree_util.tree_map_with_path(leaf, variables)


def _torch_state(variables, name_fn) -> dict:
  """{torch name: numpy array in torch's layout} of flax ``variables``: HWIO kernels ->
  OIHW (depthwise [k, k, 1, C] -> [C, 1, k, k]), Dense [in, out] -> [out, in]."""
  state = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    collection, *path = (getattr(k, "key", getattr(k, "name", str(k))) for k in keypath)
    array = np.asarray(leaf, np.float32)
    if array.ndim == 4:
      array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2:
      array = array.T
    state[name_fn(collection, tuple(path))] = array
  return state


def _backbone(arch: str):
  """(jax module, torch-name function, has its own 1000-way head, note)."""
  if arch.startswith("resnet"):
    from jaxvars.backbones import resnet_import
    from jaxvars.backbones.resnet import make_resnet
    return (make_resnet(arch, width=64, small_stem=False),
            lambda c, p: resnet_import._torch_name(c, p)[0], False, "")
  try:
    import ml_collections
    from jaxvars.backbones import BACKBONES, build_backbone
    from jaxvars.backbones import efficientnet_import
    if arch in BACKBONES:
      module = build_backbone(ml_collections.ConfigDict(
          {"arch": arch, "width": 64, "small_stem": False, "init": "random"}))
      note = ""
    else:  # Not registered yet: the module alone.
      from jaxvars.backbones.efficientnet_lite import make_efficientnet_lite
      module = make_efficientnet_lite(arch)
      note = "built with make_efficientnet_lite (not in jaxvars.backbones.BACKBONES)"
    return module, efficientnet_import.torch_name, True, note
  except Exception as e:  # noqa: BLE001 - another engineer's module, maybe mid-edit.
    raise Skip(f"jaxvars {arch} not buildable: {type(e).__name__}: {e}") from None


def row_a(arch: str, size: int, batch: int, repeats: int) -> dict:
  """One row of part (a): every contender's feature pass and PGD-5, interleaved."""
  import optax
  import torch

  import peers_torch
  from jaxvars.attacks import pgd

  model, name_fn, own_head, note = _backbone(arch)
  rng = np.random.default_rng(0)
  image0 = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = _randomise_norms(jax.jit(model.init)(jax.random.key(0), image0), rng)
  state = _torch_state(variables, name_fn)
  head = {}
  if not own_head:  # A random 1000-way Dense head on the pooled feature, the same in torch.
    dim = model.feature_dim
    head = {"w": (rng.standard_normal((dim, 1000)) / np.sqrt(dim)).astype(np.float32),
            "b": rng.uniform(-0.1, 0.1, 1000).astype(np.float32)}
    state["fc.weight"], state["fc.bias"] = head["w"].T, head["b"]
  try:
    net = peers_torch.build_classifier(arch, state, getattr(model, "preprocess", "unit"))
  except ImportError as e:
    raise Skip(f"torch reference of {arch} not importable: {e}") from None
  # BatchNorm statistics of a random batch (calibrated in torch, copied into the jax
  # variables: both sides hold the same numbers).
  calib = (rng.integers(0, 256, (8, size, size, 3)) / 255.0).astype(np.float32)
  variables = _set_stats(variables, name_fn,
                         peers_torch.calibrate_norms(net, peers_torch.to_nchw(calib)))
  v = {"backbone": variables, "head": head}

  def logits_fn(v, x):
    out = model.apply(v["backbone"], x, train=False)
    return out["logits"] if own_head else out["pooled"] @ v["head"]["w"] + v["head"]["b"]

  def ce(v, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(v, x), y).mean()

  def programs():
    """Fresh function objects: jax caches traces by function, and layers.py's choice is
    made while tracing, so each form needs its own."""
    def features_fn(v, x):
      return model.apply(v["backbone"], x, train=False)["pooled"]

    def attack_fn(v, x, y, key):
      return pgd(lambda xa: ce(v, xa, y), x, eps=EPS, alpha=ALPHA, steps=STEPS, key=key,
                 random_start=True)
    return features_fn, attack_fn

  x = (rng.integers(0, 256, (batch, size, size, 3)) / 255.0).astype(np.float32)
  v_dev, x_dev = jax.device_put(v), jax.device_put(x)
  logits = jax.jit(logits_fn)
  y = np.asarray(jnp.argmax(logits(v_dev, x_dev), -1)).astype(np.int32)  # Clean predictions.
  key, y_dev = jax.random.key(1), jax.device_put(y)
  compiled, compile_s, hlo = {}, {}, {}
  for form in ("on", "off"):
    features_fn, attack_fn = programs()
    with plain_xla_convs() if form == "off" else contextlib.nullcontext():
      compiled["feat", form], compile_s[f"feature_{form}"], hlo["feat", form] = _compile(
          features_fn, v_dev, x_dev)
      compiled["pgd", form], compile_s[f"pgd_{form}"], hlo["pgd", form] = _compile(
          attack_fn, v_dev, x_dev, y_dev, key)
  x_t, y_t = peers_torch.to_nchw(x), torch.from_numpy(y).long()
  x_nchw = x_t.numpy()
  art = peers_torch.make_art_pgd(net, image_size=size, batch_size=batch, eps=EPS, alpha=ALPHA,
                                 steps=STEPS)

  def torch_pgd():
    return peers_torch.pgd(net, x_t, y_t, eps=EPS, alpha=ALPHA, steps=STEPS,
                           generator=torch.Generator().manual_seed(1))

  fns = {
      "feature/jax": lambda: jax.block_until_ready(compiled["feat", "on"](v_dev, x_dev)),
      "feature/jax_xla": lambda: jax.block_until_ready(compiled["feat", "off"](v_dev, x_dev)),
      "feature/torch": lambda: peers_torch.feature_pass(net, x_t),
      "pgd/jax": lambda: jax.block_until_ready(compiled["pgd", "on"](v_dev, x_dev, y_dev, key)),
      "pgd/jax_xla": lambda: jax.block_until_ready(compiled["pgd", "off"](v_dev, x_dev, y_dev,
                                                                         key)),
      "pgd/torch": torch_pgd,
      "pgd/art": lambda: art(x_nchw, y),
  }
  best, outs = interleaved(fns, repeats)

  pooled_jax = np.asarray(outs["feature/jax"])
  pooled_torch = outs["feature/torch"].numpy()
  advs = {"jax": np.asarray(outs["pgd/jax"]),
          "jax_xla": np.asarray(outs["pgd/jax_xla"]),
          "torch": outs["pgd/torch"].numpy().transpose(0, 2, 3, 1),
          "art": np.asarray(outs["pgd/art"]).transpose(0, 2, 3, 1)}
  row = {"arch": arch, "image_size": size, "batch": batch, "note": note,
         "seconds": best, "compile_seconds": compile_s,
         "images_per_s": {k: batch / t for k, t in best.items()},
         "pooled_max_abs_diff_jax_torch": float(np.max(np.abs(pooled_jax - pooled_torch))),
         "pooled_max_abs": float(np.max(np.abs(pooled_jax))),
         "pooled_mean_std_over_batch": float(np.mean(np.std(pooled_jax, axis=0))),
         "pooled_max_abs_diff_plain_xla": float(np.max(np.abs(
             pooled_jax - np.asarray(outs["feature/jax_xla"])))),
         "plain_xla_programs_differ": {"feature": hlo["feat", "on"] != hlo["feat", "off"],
                                       "pgd": hlo["pgd", "on"] != hlo["pgd", "off"]},
         "linf_255": {}, "in_eps_ball": {}, "label_flip_rate": {}, "ce_adv": {}}
  ce_jit = jax.jit(ce)
  row["ce_clean"] = float(ce_jit(v_dev, x_dev, y))
  for name, adv in advs.items():
    linf = float(np.max(np.abs(adv - x)) * 255.0)
    row["linf_255"][name] = linf
    row["in_eps_ball"][name] = bool(linf <= EPS + 1e-3 and adv.min() >= 0.0 and adv.max() <= 1.0)
    pred = np.asarray(jnp.argmax(logits(v_dev, jnp.asarray(adv, jnp.float32)), -1))
    row["label_flip_rate"][name] = float(np.mean(pred != y))
    row["ce_adv"][name] = float(ce_jit(v_dev, jnp.asarray(adv, jnp.float32), y))
  ips = row["images_per_s"]
  row["ratio"] = {"feature_jax/torch": ips["feature/jax"] / ips["feature/torch"],
                  "feature_jax/jax_xla": ips["feature/jax"] / ips["feature/jax_xla"],
                  "pgd_jax/torch": ips["pgd/jax"] / ips["pgd/torch"],
                  "pgd_jax/art": ips["pgd/jax"] / ips["pgd/art"],
                  "pgd_jax/jax_xla": ips["pgd/jax"] / ips["pgd/jax_xla"]}
  return row


def part_a(repeats: int, quick: bool, only=()) -> dict:
  rows = []
  table = [r for r in (QUICK_ROWS_A if quick else ROWS_A) if not only or f"{r[0]}@{r[1]}" in only]
  if not table:
    raise Skip(f"--rows={','.join(only)} matches no row of {'QUICK_ROWS_A' if quick else 'ROWS_A'}")
  for arch, size, batch in table:
    t = time.perf_counter()
    try:
      row = row_a(arch, size, batch, repeats)
    except Skip as e:
      row = {"arch": arch, "image_size": size, "batch": batch, "skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others.
      row = {"arch": arch, "image_size": size, "batch": batch,
             "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    row["wall_seconds"] = time.perf_counter() - t
    rows.append(row)
    print_a([row], header=not rows[:-1])
  return {"rows": rows, "pgd": {"eps": EPS, "alpha": ALPHA, "steps": STEPS,
                                "random_start": True, "loss": "mean cross-entropy on the "
                                "clean predictions, 1000-way linear head on the pooled "
                                "feature", "jaxvars": "keep_best=True, quantize=True "
                                "(defaults); the torch loop does the same",
                                "art": "num_random_init=1; ART also predicts on the result "
                                "for its success-rate log line",
                                "jax_xla": "jaxvars with layers.SMALL_MAP_MAX_SIDE=0 and "
                                "layers.is_depthwise->False while tracing (XLA's own "
                                "convolutions everywhere)"}}


def print_a(rows, header=True):
  if header:
    print("\n(a) images/s (min over repetitions); x = jaxvars / peer; xla = jaxvars with "
          "layers.py's CPU conv forms off; rel dfeat = max |pooled jax - pooled torch| / max "
          "|pooled|; L = layers.py changed the PGD program")
    print(f"{'model':18} {'px':>3} {'B':>3} | {'feat jax':>8} {'xla':>7} {'torch':>7} "
          f"{'x torch':>7} | {'PGD jax':>7} {'xla':>7} {'torch':>7} {'ART':>7} {'x torch':>7} "
          f"{'x ART':>6} | {'in eps-ball j/t/A':>17} {'rel dfeat':>9} {'L':>1}")
  for r in rows:
    head = f"{r['arch']:18} {r['image_size']:3d} {r['batch']:3d} | "
    if "skipped" in r or "error" in r:
      print(head + ("skipped: " + r["skipped"] if "skipped" in r else "ERROR: " + r["error"]))
      continue
    i, q = r["images_per_s"], r["ratio"]
    ball = "/".join("y" if r["in_eps_ball"][k] else "N" for k in ("jax", "torch", "art"))
    print(head + f"{i['feature/jax']:8.1f} {i['feature/jax_xla']:7.1f} "
          f"{i['feature/torch']:7.1f} {q['feature_jax/torch']:7.2f} | {i['pgd/jax']:7.1f} "
          f"{i['pgd/jax_xla']:7.1f} {i['pgd/torch']:7.1f} {i['pgd/art']:7.1f} "
          f"{q['pgd_jax/torch']:7.2f} {q['pgd_jax/art']:6.2f} | {ball:>17} "
          f"{r['pooled_max_abs_diff_jax_torch'] / r['pooled_max_abs']:9.1e} "
          f"{'y' if r['plain_xla_programs_differ']['pgd'] else 'N':>1}")
    if r.get("note"):
      print(f"{'':27}note: {r['note']}")


# ------------------------------------------------------------------------------------------
# (b) VBPR against Cornac.


def part_b(repeats: int, quick: bool, hm_dir: str, tfds_dir: str) -> dict:
  hm_dir = os.path.abspath(hm_dir)
  if not os.path.exists(os.path.join(hm_dir, "transactions_train.csv")):
    raise Skip(f"H&M sample not found at {hm_dir} (--hm_dir)")
  import peers_torch
  from configs import joint
  from jaxvars.evaluation.ranking import candidate_matrix, candidate_scores, evaluate_scores
  from jaxvars.experiment import build, make_consts
  from jaxvars.training.recommender import train_recommender

  config = joint.get_config("cpu,hm,vbpr")
  config.data.manual_dir = hm_dir
  config.data.tfds_dir = tfds_dir
  if quick:
    config.data.image_size = 32  # Faster features; the timed training does not depend on it.
  config.num_devices = 1
  rc = config.recommender
  rc.form, rc.factors, rc.visual_factors, rc.lr_drop_epochs = "he", 64, 64, 0
  config.checkpoint.every_epochs = 10**6  # Only the final checkpoint (after the timed span).
  config.eval.every_epochs = 0
  t = time.perf_counter()
  exp = build(config, workdir=None)
  consts = make_consts(exp)
  setup_s = time.perf_counter() - t
  data = exp.data
  features = np.asarray(consts["features"], np.float32)
  cands = candidate_matrix(data.test_items, data.eval_negatives)
  p0 = jax.device_get(exp.params["recommender"])
  init = {"Gu": p0["user_factors"], "Gi": p0["item_factors"], "Tu": p0["user_visual_factors"],
          "E": p0["visual_projection"], "Bi": p0["item_bias"], "Bp": p0["visual_bias"][:, None]}
  init = {k: np.array(v, np.float32) for k, v in init.items()}
  out = {"data": data.summary(), "features": list(features.shape), "setup_seconds": setup_s,
         "image_size": config.data.image_size, "backbone": f"{config.backbone.arch} "
         f"width {config.backbone.width} (random init, {config.backbone.feature_norm})",
         "settings": []}
  print(f"\n(b) VBPR (He form, K=K'=64, Adam lr {rc.lr}) on H&M: {data.num_users} users, "
        f"{data.num_items} items, {len(data.train_users)} training pairs, features "
        f"{features.shape[1]}-d")
  print(f"{'epochs':>6} {'batch':>5} | {'jax s/ep':>8} {'jax total s':>11} {'HR@10':>6} | "
        f"{'cornac s/ep':>11} {'HR@10':>6} | {'speed x':>7}")
  for epochs, batch in QUICK_SETTINGS_B if quick else SETTINGS_B:
    rc.epochs, rc.batch_size = epochs, batch
    exp_s = dataclasses.replace(exp, rec_steps_per_epoch=-(-len(data.train_users) // batch))
    jax_epoch, jax_total, jax_hr, cornac_epoch, cornac_hr = [], [], [], [], []
    for _ in range(repeats):
      workdir = tempfile.mkdtemp(prefix="peers_vbpr_")
      ends = []
      # A fresh copy of the initial parameters: the epoch step donates its state.
      exp_r = dataclasses.replace(exp_s, params={**exp.params, "recommender": jax.tree.map(
          jnp.copy, exp.params["recommender"])})
      try:
        t = time.perf_counter()
        state, _, _, _ = train_recommender(
            exp_r, consts, workdir, on_epoch_end=lambda params, epoch: ends.append(
                time.perf_counter()) and None)
        jax_total.append(time.perf_counter() - t)
      finally:
        shutil.rmtree(workdir, ignore_errors=True)
      jax_epoch.append((ends[-1] - ends[0]) / (len(ends) - 1))
      scores = candidate_scores(exp.models.recommender, state.params, consts["features"],
                                cands, config.eval.batch_users)
      jax_hr.append(evaluate_scores(scores, (10,))["HR@10"])
      # Cornac's loss is a sum over the batch (jaxvars': a mean): its L2 weights are scaled
      # so that loss_cornac = batch * loss_jaxvars (Adam is invariant to that scale).
      model, fit_s = peers_torch.cornac_vbpr(
          train_users=data.train_users, train_items=data.train_items,
          num_users=data.num_users, num_items=data.num_items, features=features, k=rc.factors,
          k2=rc.visual_factors, epochs=epochs, batch_size=batch, lr=rc.lr,
          lambda_w=2 * rc.reg, lambda_b=2 * rc.reg, lambda_e=2 * batch * rc.reg_visual,
          init_params=init, seed=config.seed)
      cornac_epoch.append(fit_s / epochs)
      cornac_hr.append(evaluate_scores(peers_torch.cornac_candidate_scores(model, cands),
                                       (10,))["HR@10"])
    row = {"epochs": epochs, "batch": batch, "lr": rc.lr,
           "jax_s_per_epoch": min(jax_epoch), "jax_total_s": min(jax_total),
           "jax_hr10": jax_hr[-1], "jax_hr10_all": jax_hr,
           "cornac_s_per_epoch": min(cornac_epoch), "cornac_hr10": cornac_hr[-1],
           "cornac_hr10_all": cornac_hr,
           "speed_ratio_cornac/jax": min(cornac_epoch) / min(jax_epoch)}
    out["settings"].append(row)
    print(f"{epochs:6d} {batch:5d} | {row['jax_s_per_epoch']:8.3f} {row['jax_total_s']:11.2f} "
          f"{row['jax_hr10']:6.4f} | {row['cornac_s_per_epoch']:11.3f} {row['cornac_hr10']:6.4f} "
          f"| {row['speed_ratio_cornac/jax']:7.1f}")
  out["notes"] = (
      "Same initial parameters (jaxvars' init copied into Cornac's init_params), Adam, lr, "
      "K = k = 64 latent and K' = k2 = 64 visual factors (Cornac's k/k2 are jaxvars' "
      "factors/visual_factors: the same split). L2: Cornac lambda_w = lambda_b = 2 reg, "
      "lambda_e = 2 batch reg_visual (Cornac weighs b_j's L2 by lambda_b / 10, jaxvars "
      "like b_i's). Negatives: both uniform over the user's non-training items, drawn by "
      "each library. jaxvars s/epoch = (end of epoch N - end of epoch 1) / (N - 1); total "
      "= train_recommender wall time incl. compilation and the final checkpoint. Cornac "
      "s/epoch = model.fit time / N. HR@10 of the last repetition (all in *_all).")
  print("    jax s/epoch: epochs 2..N (compilation excluded); cornac s/epoch: fit time / N; "
        "speed x = cornac s/epoch / jax s/epoch")
  return out


# ------------------------------------------------------------------------------------------
# (c) The defence step and device scaling.


def part_c(repeats: int, quick: bool) -> dict:
  from flax.training.train_state import TrainState

  from configs import joint
  from jaxvars import sharding
  from jaxvars.attacks.spec import attack_spec
  from jaxvars.backbones import build_backbone
  from jaxvars.data import splits
  from jaxvars.defenses.denoiser import Denoiser
  from jaxvars.defenses.detector import ProjectionHead
  from jaxvars.features import FeatureExtractor, feature_stats, normalize_features
  from jaxvars.models import Models
  from jaxvars.pixels import to_float
  from jaxvars.recommenders import build_recommender
  from jaxvars.training.defense_step import LOSS_TERMS, make_defense_step, stage_optimizer
  from jaxvars.training.recommender import make_epoch_fn, make_optimizer

  if len(jax.devices()) < max(DEVICES_C):
    raise Skip(f"{len(jax.devices())} jax devices; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} "
               f"must give {max(DEVICES_C)}")
  preset = "tiny" if quick else "cpu"
  config = joint.get_config(preset)
  s, sy, dn = config.data.image_size, config.data.synthetic, config.denoiser
  num_users, num_items = sy.num_users, sy.num_items
  backbone = build_backbone(config.backbone)  # The preset's architecture (random weights).
  image0 = jnp.zeros((1, s, s, 3), jnp.float32)
  bvars = jax.jit(backbone.init)(jax.random.key(0), image0)
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
  n = num_users * sy.mean_interactions
  users, items, _ = splits.binarize(rng.integers(0, num_users, n), rng.integers(0, num_items, n),
                                    np.zeros(n, np.int64))
  fb = config.backbone.feature_batch_size
  raw = FeatureExtractor(backbone, bvars, sharding.make_mesh(1), fb)(images, desc="features")
  stats = feature_stats(raw)
  consts = jax.device_get({"backbone": bvars, "stats": stats, "features": normalize_features(
      jnp.asarray(raw), stats, config.backbone.feature_norm)})
  b = config.defense.batch_size
  batch_items = rng.choice(num_items, b, replace=False).astype(np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=num_users, num_items=num_items,
                                  positive_keys=splits.pair_keys(users, items, num_items),
                                  per_role=config.defense.triplets_per_item, rng=rng)
  host_batch = {"images": images[batch_items], "items": batch_items, "triplets": triplets}
  stage = config.stages.joint
  weights = {t: float(config.loss[t]) for t in LOSS_TERMS}
  attack = attack_spec(config.attack, "pgd", config.defense.train_eps, objective="bpr")
  rec_batch, rec_steps = config.recommender.batch_size, (4 if quick else 25)
  rec_triplets = {k: rng.integers(0, hi, (rec_steps, rec_batch)).astype(np.int32)
                  for k, hi in (("user", num_users), ("pos", num_items), ("neg", num_items))}
  feat_images = images[:fb]

  fns, kind_keys, compile_s = {}, None, {}
  for nd in DEVICES_C:
    mesh = sharding.make_mesh(nd)
    repl = sharding.replicated(mesh)
    c = jax.device_put(consts, repl)
    holder = {"defense": jax.device_put(TrainState.create(
        apply_fn=None, params=params, tx=stage_optimizer(tuple(stage.trainable), stage.lr)), repl),
        "bpr": jax.device_put(TrainState.create(
            apply_fn=None, params=params["recommender"],
            tx=make_optimizer(config.recommender, rec_steps)), repl)}
    step = make_defense_step(models, mesh, weights=weights, mix=(1, 1, 1), attack=attack,
                             temperature=config.detector.temperature)
    batch = sharding.shard_batch(host_batch, mesh)
    t = time.perf_counter()
    if kind_keys is None:  # One key per input kind (clean, fgsm, pgd), read off the step.
      kind_keys, seed = {}, 0
      while len(kind_keys) < 3:
        key = jax.random.key(seed)
        holder["defense"], m = step(holder["defense"], batch, c, key)
        kind_keys.setdefault(int(m["input_kind"]), key)
        seed += 1
    else:
      jax.block_until_ready(step(holder["defense"], batch, c, kind_keys[0]))
      holder["defense"] = jax.device_put(TrainState.create(  # The call above donated it.
          apply_fn=None, params=params, tx=stage_optimizer(tuple(stage.trainable), stage.lr)),
          repl)
    compile_s[f"defense/{nd}"] = time.perf_counter() - t

    def defense(kind, holder=holder, step=step, batch=batch, c=c):
      def run():
        holder["defense"], m = step(holder["defense"], batch, c, kind_keys[kind])
        jax.block_until_ready(m)
        assert int(m["input_kind"]) == kind
        return m
      return run

    epoch_fn = make_epoch_fn(rec, mesh)
    steps_on_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, sharding.DATA_AXIS))
    rec_dev = jax.device_put(rec_triplets, steps_on_data)

    def bpr(holder=holder, epoch_fn=epoch_fn, rec_dev=rec_dev, c=c):
      holder["bpr"], m = epoch_fn(holder["bpr"], rec_dev, c["features"])
      return jax.block_until_ready(m)

    pooled = jax.jit(lambda v, x: backbone.apply(v, to_float(x), train=False)["pooled"],
                     out_shardings=repl)
    feat_dev = sharding.shard_batch(feat_images, mesh)
    fns[f"defense_clean/{nd}"] = defense(0)
    fns[f"defense_fgsm/{nd}"] = defense(1)
    fns[f"defense_pgd/{nd}"] = defense(2)
    fns[f"bpr_epoch/{nd}"] = bpr
    fns[f"feature/{nd}"] = lambda pooled=pooled, c=c, x=feat_dev: jax.block_until_ready(
        pooled(c["backbone"], x))
  best, _ = interleaved(fns, repeats)
  rows = []
  for nd in DEVICES_C:
    t = {k: best[f"{k}/{nd}"] for k in ("defense_clean", "defense_fgsm", "defense_pgd",
                                       "bpr_epoch", "feature")}
    rows.append({"devices": nd, "seconds": t,
                 "defense_items_per_s": {k: b / t[f"defense_{k}"] for k in ("clean", "fgsm",
                                                                          "pgd")},
                 "defense_mix_items_per_s": 3 * b / (t["defense_clean"] + t["defense_fgsm"]
                                                     + t["defense_pgd"]),
                 "bpr_triplets_per_s": rec_steps * rec_batch / t["bpr_epoch"],
                 "feature_images_per_s": fb / t["feature"]})
  base = rows[0]
  for r in rows:
    r["scaling_vs_1"] = {
        "defense_mix": r["defense_mix_items_per_s"] / base["defense_mix_items_per_s"],
        "bpr": r["bpr_triplets_per_s"] / base["bpr_triplets_per_s"],
        "feature": r["feature_images_per_s"] / base["feature_images_per_s"]}
  out = {"preset": preset, "image_size": s, "backbone": f"{config.backbone.arch} width "
         f"{config.backbone.width}{' small stem' if config.backbone.small_stem else ''}",
         "defense": {"batch": b, "mix": [1, 1, 1], "terms": list(LOSS_TERMS),
                     "weights": weights, "trainable": list(stage.trainable), "lr": stage.lr,
                     "attack": dataclasses.asdict(attack),
                     "denoiser": {k: dn[k] for k in ("channels", "num_blocks", "patch",
                                                     "attn_dim", "heads")}},
         "bpr": {"batch": rec_batch, "steps_per_epoch_call": rec_steps, "form":
                 config.recommender.form, "factors": config.recommender.factors,
                 "users": num_users, "items": num_items},
         "feature": {"batch": fb}, "warmup_seconds": compile_s, "rows": rows}
  print(f"\n(c) {preset} preset ({out['backbone']}, {s} px, defence batch {b}, PGD "
        f"{attack.steps} steps), simulated CPU devices; (x) = vs 1 device")
  print(f"{'dev':>3} | {'defence items/s: clean':>22} {'fgsm':>7} {'pgd':>7} {'mix 1:1:1':>9} "
        f"{'(x)':>5} | {'BPR triplets/s':>14} {'(x)':>5} | {'feat img/s':>10} {'(x)':>5}")
  for r in rows:
    d, sc = r["defense_items_per_s"], r["scaling_vs_1"]
    print(f"{r['devices']:3d} | {d['clean']:22.1f} {d['fgsm']:7.1f} {d['pgd']:7.1f} "
          f"{r['defense_mix_items_per_s']:9.1f} {sc['defense_mix']:5.2f} | "
          f"{r['bpr_triplets_per_s']:14.0f} {sc['bpr']:5.2f} | {r['feature_images_per_s']:10.1f} "
          f"{sc['feature']:5.2f}")
  return out


# ------------------------------------------------------------------------------------------


def environment(torch_versions: dict) -> dict:
  import flax
  import jaxlib
  import optax
  return {"python": platform.python_version(), "platform": platform.platform(),
          "machine": platform.machine(), "cpu_count": os.cpu_count(),
          "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else None, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
          "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), **torch_versions,
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (np.bool_,)):
    return bool(o)
  return str(o)


def part_c_in_child() -> dict:
  """Part (c) in a child process with 8 simulated devices (this one times (a) and (b) on
  one device; see the note at the top); its table is printed there, its JSON returned."""
  with tempfile.TemporaryDirectory(prefix="peers_c_") as tmp:
    out = os.path.join(tmp, "c.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--parts=c", f"--out={out}",
           f"--repeats={_REPEATS.value}", f"--torch_threads={_TORCH_THREADS.value}"]
    if _QUICK.value:
      cmd.append("--quick")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith(_COUNT_FLAG))
    r = subprocess.run(cmd, env=env, check=False)
    if r.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(f"part (c) child process failed (exit {r.returncode}): {' '.join(cmd)}")
    with open(out) as f:
      child = json.load(f)
  return {**child["c"], "environment": child["environment"]}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import peers_torch
  threads = _TORCH_THREADS.value or os.cpu_count()
  result = {"environment": environment(peers_torch.setup(threads)),
            "settings": {"repeats": _REPEATS.value, "quick": _QUICK.value,
                         "parts": _PARTS.value, "rows": _ROWS.value,
                         "hm_dir": os.path.abspath(_HM_DIR.value)},
            "wall_seconds": {}}
  env = result["environment"]
  print(f"jax {env['jax']} ({env['jax_devices']} {env['jax_backend']} devices), torch "
        f"{env['torch']} ({env['torch_threads']} threads), art {env['art']}, cornac "
        f"{env['cornac']}, {env['cpu_count']} CPUs; repeats {_REPEATS.value}"
        f"{', quick' if _QUICK.value else ''}")
  parts = {"a": lambda: part_a(_REPEATS.value, _QUICK.value, tuple(_ROWS.value)),
           "b": lambda: part_b(_REPEATS.value, _QUICK.value, _HM_DIR.value, _TFDS_DIR.value),
           "c": lambda: part_c(_REPEATS.value, _QUICK.value) if _PARTS.value == ["c"]
                        else part_c_in_child()}
  unknown = set(_PARTS.value) - set(parts)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; expected a subset of a,b,c")
  t_all = time.perf_counter()
  for name in ("a", "b", "c"):
    if name not in _PARTS.value:
      continue
    t = time.perf_counter()
    try:
      result[name] = parts[name]()
    except Skip as e:
      result[name] = {"skipped": str(e)}
      print(f"\n({name}) skipped: {e}")
    except Exception as e:  # noqa: BLE001 - keep the other parts' results.
      result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
      print(f"\n({name}) ERROR: {type(e).__name__}: {e}")
      traceback.print_exc()
    result["wall_seconds"][name] = time.perf_counter() - t
    print(f"    part ({name}): {result['wall_seconds'][name]:.0f} s")
  result["wall_seconds"]["total"] = time.perf_counter() - t_all
  result["provenance"] = provenance.describe()
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2, default=_json_default)
  print(f"\nwritten {_OUT.value} ({result['wall_seconds']['total']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
