"""Chooses ``jaxvars.layers.SMALL_MAP_MAX_SIDE`` (XLA's convolution vs patches + matmul for
dense convolutions, by output map size) and checks the depthwise form (XLA's convolution vs
shift-and-add), forward and input gradient, on the shapes this project's backbones run.

  python benchmarks/small_map_conv.py --out=/tmp/small_map_conv.json [--repeats=5]

For every case (a backbone's convolution: channels, kernel, groups) and output side
1, 2, 3, 4, 6, 8, 16 (and 28, 56 for depthwise), the forms are jitted, warmed up, and
timed in interleaved repetitions (minimum of ``--repeats``). Prints a table (ms and the
speed-up of the fast form) and the largest side at which patches is faster for every
dense case, and writes JSON.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxvars import layers, provenance  # noqa: E402

_OUT = flags.DEFINE_string("out", "small_map_conv.json", "JSON output path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (minimum reported).")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.")
_SIDES = flags.DEFINE_list("sides", ["1", "2", "3", "4", "6", "8", "16"], "Output sides.")
_DEPTHWISE_SIDES = flags.DEFINE_list("depthwise_sides", ["2", "4", "8", "16", "28", "56"],
                                     "Output sides of the depthwise cases.")

# (name, in channels, out channels, kernel, feature groups): the 3x3 convs of ResNet-18
# stage 4 (width 64 and the CPU presets' width 32), and EfficientNet-Lite0's depthwise
# convs (early wide maps, late narrow ones).
CASES = (("resnet 3x3 512->512", 512, 512, 3, 1),
         ("resnet 3x3 256->256", 256, 256, 3, 1),
         ("depthwise 3x3 x96", 96, 96, 3, 96),
         ("depthwise 5x5 x672", 672, 672, 5, 672),
         ("depthwise 3x3 x1152", 1152, 1152, 3, 1152))
DN = ("NHWC", "HWIO", "NHWC")


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main(argv):
  del argv
  rows = []
  print(f"{'case':22} {'side':>4} {'xla fwd ms':>10} {'fast fwd':>10} {'x':>6} "
        f"{'xla grad ms':>11} {'fast grad':>10} {'x':>6}  (fast: patches for dense, "
        "shift-and-add for depthwise)")
  for name, cin, cout, k, groups in CASES:
    sides = _SIDES.value if groups == 1 else _DEPTHWISE_SIDES.value
    for side in (int(s) for s in sides):
      key = jax.random.key(side)
      x = jax.random.normal(key, (_BATCH.value, side, side, cin), jnp.float32)
      w = jax.random.normal(jax.random.fold_in(key, 1), (k, k, cin // groups, cout)) * 0.05
      xla = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                                  feature_group_count=groups)
      if groups == 1:
        fast = lambda x, w: layers.patches_conv(x, w, (1, 1), "SAME")
      else:
        fast = lambda x, w: layers.shift_add_depthwise(x, w, (1, 1), "SAME")
      fns = {}
      for form, conv in (("xla", xla), ("fast", fast)):
        fns[form, "fwd"] = jax.jit(conv)
        fns[form, "grad"] = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2)))
      times = {key_: float("inf") for key_ in fns}
      for key_, fn in fns.items():
        jax.block_until_ready(fn(x, w))
      for _ in range(_REPEATS.value):  # Interleaved: drifts in machine load hit both forms.
        for key_, fn in fns.items():
          times[key_] = min(times[key_], _time(fn, x, w, repeats=1))
      row = {"case": name, "side": side, "batch": _BATCH.value,
             "fast_form": "patches" if groups == 1 else "shift_add",
             **{f"{f}_{d}_ms": 1e3 * t for (f, d), t in times.items()}}
      row["speedup_fwd"] = row["xla_fwd_ms"] / row["fast_fwd_ms"]
      row["speedup_grad"] = row["xla_grad_ms"] / row["fast_grad_ms"]
      rows.append(row)
      print(f"{name:22} {side:4d} {row['xla_fwd_ms']:10.2f} {row['fast_fwd_ms']:10.2f} "
            f"{row['speedup_fwd']:6.2f} {row['xla_grad_ms']:11.2f} {row['fast_grad_ms']:10.2f} "
            f"{row['speedup_grad']:6.2f}", flush=True)
  dense = [r for r in rows if r["fast_form"] == "patches"]
  sides = sorted({r["side"] for r in dense})
  faster = [s for s in sides if all(min(r["speedup_fwd"], r["speedup_grad"]) > 1.0
                                    for r in dense if r["side"] == s)]
  best = 0
  for s in sides:  # The largest side such that patches wins at it and every smaller side.
    if s not in faster:
      break
    best = s
  print(f"\npatches + matmul is faster for every dense case at output sides <= {best} "
        f"(jaxvars.layers.SMALL_MAP_MAX_SIDE = {layers.SMALL_MAP_MAX_SIDE})")
  slow = [r for r in rows if r["fast_form"] == "shift_add"
          and min(r["speedup_fwd"], r["speedup_grad"]) <= 1.0]
  print("shift-and-add is faster than XLA for every depthwise case" if not slow else
        f"shift-and-add is NOT faster at: {[(r['case'], r['side']) for r in slow]}")
  out = {"jax": jax.__version__, "platform": jax.devices()[0].platform,
         "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
         "largest_side_patches_faster": best, "rows": rows,
         "provenance": provenance.describe()}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=2)
  print(f"written {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
