"""Minimal reproduction for an upstream XLA report: on the CPU backend, a 3x3 convolution
whose spatial map is tiny (2x2, batch 32, 512 -> 512 channels) runs tens of times slower
than the same convolution written as im2col (``lax.conv_general_dilated_patches``) + one
matrix product, forward and backward, while at 8x8 and larger XLA's convolution is the
faster of the two. Only jax and numpy are needed; nothing from this project.

  JAX_PLATFORMS=cpu python benchmarks/xla_cpu_small_conv_repro.py

Prints jax/jaxlib versions, CPU count, and for each map size the best-of-5 milliseconds of
both forms (forward, and the gradient with respect to the input) and their max abs
difference.
"""

import os
import platform
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def im2col_conv(x, w):
  kh, kw, cin, cout = w.shape
  p = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "SAME", dimension_numbers=DN)
  return p @ jnp.transpose(w, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)  # Patches: C major.


def best_ms(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * min(times)


def main():
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  print(f"{'map':>5} {'conv fwd ms':>12} {'im2col fwd':>11} {'conv dx ms':>11} {'im2col dx':>10} "
        f"{'max |diff|':>11}")
  for side in (1, 2, 4, 8, 16):
    x = jax.random.normal(jax.random.key(0), (32, side, side, 512), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 3, 512, 512), jnp.float32) * 0.02
    f_conv, f_cols = jax.jit(conv), jax.jit(im2col_conv)
    g_conv = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2)))
    g_cols = jax.jit(jax.grad(lambda x, w: jnp.sum(im2col_conv(x, w) ** 2)))
    diff = float(np.max(np.abs(np.asarray(f_conv(x, w)) - np.asarray(f_cols(x, w)))))
    print(f"{side}x{side:<3} {best_ms(f_conv, x, w):12.2f} {best_ms(f_cols, x, w):11.2f} "
          f"{best_ms(g_conv, x, w):11.2f} {best_ms(g_cols, x, w):10.2f} {diff:11.2e}", flush=True)


if __name__ == "__main__":
  main()
