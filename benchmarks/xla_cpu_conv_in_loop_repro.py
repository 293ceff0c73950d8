"""Minimal reproduction for an upstream XLA report: on the CPU backend, the input gradient
of a convolution runs several times slower inside a while loop (``lax.fori_loop``/``lax.scan``)
than the same computation unrolled, while the forward convolution is equally fast in both.
Only jax and numpy are needed; nothing from this project.

  JAX_PLATFORMS=cpu python benchmarks/xla_cpu_conv_in_loop_repro.py [--json=out.json]

For each case (channels, kernel, map side; batch 32) it times, best of 3, four jitted
programs that apply ``step`` four times: the forward ``tanh(conv(z))`` and the input
gradient of ``sum(tanh(conv(z)))``, each as a ``fori_loop`` and as the same loop with
``unroll=True`` (straight-line code). It prints jax/jaxlib versions, the CPU count,
milliseconds, the loop / unrolled ratio, the compile time of each program, and the max
abs difference of the two forms' outputs.

Found in jaxvars' PGD (a ``fori_loop`` of input gradients): PGD-5 through the CPU
preset's denoiser (16 channels, 96 px) was several times slower in the loop than
unrolled. ``jaxvars.attacks.linf.pgd`` now unrolls on CPU.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")
# (channels, kernel side, map side): a 16-channel image-to-image trunk at 96 px (3x3, 9x9),
# and ResNet-style 3x3 layers at 32x32 and 8x8.
CASES = ((16, 3, 96), (16, 9, 96), (64, 3, 32), (256, 3, 8))
STEPS = 4


def timed(fn, *args, repeats=3):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return out, 1e3 * best, compile_s


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default="", help="Also write the rows here.")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; batch {args.batch}, {STEPS} steps")
  print(f"{'case':24} {'what':5} {'loop ms':>9} {'unrolled':>9} {'ratio':>6} "
        f"{'compile loop/unrolled s':>24} {'max |diff|':>10}")
  rows = []
  for channels, k, side in CASES:
    x = jax.random.uniform(jax.random.key(0), (args.batch, side, side, channels))
    w = jax.random.normal(jax.random.key(1), (k, k, channels, channels)) / (k * np.sqrt(channels))

    def step(z, w=w):
      return jnp.tanh(lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=DN))

    grad = jax.grad(lambda z: step(z).sum())
    for what, body in (("fwd", step), ("dx", grad)):
      loop = jax.jit(lambda z, body=body: lax.fori_loop(0, STEPS, lambda t, u: body(u), z))
      flat = jax.jit(lambda z, body=body: lax.fori_loop(0, STEPS, lambda t, u: body(u), z,
                                                          unroll=True))
      out_l, ms_l, c_l = timed(loop, x)
      out_u, ms_u, c_u = timed(flat, x)
      diff = float(jnp.max(jnp.abs(out_l - out_u)))
      case = f"{channels}->{channels} {k}x{k} at {side}x{side}"
      print(f"{case:24} {what:5} {ms_l:9.1f} {ms_u:9.1f} {ms_l / ms_u:6.1f} "
            f"{c_l:11.1f} / {c_u:<10.1f} {diff:10.2e}", flush=True)
      rows.append({"case": case, "what": what, "loop_ms": ms_l, "unrolled_ms": ms_u,
                   "compile_loop_s": c_l, "compile_unrolled_s": c_u, "max_abs_diff": diff})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                 "cpus": os.cpu_count(), "batch": args.batch, "rows": rows}, f, indent=1)
    print(f"written {args.json}")


if __name__ == "__main__":
  main()
