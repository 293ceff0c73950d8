"""FGSM and PGD in the L-inf ball, for any differentiable ``loss_fn(images) -> scalar``.

Units: images are float32 in [0, 1], NHWC. ``eps`` and ``alpha`` are in 1/255 units
(``eps=8`` allows a change of 8/255 per pixel and channel). Attacks *maximise*
``loss_fn``; pass a loss whose increase is the attacker's goal: a scalar, or one loss per
image [B] (the attacks then ascend their mean, and PGD keeps each image's best iterate).
The models inside ``loss_fn`` must run in eval mode (no BatchNorm statistics updates, no
dropout), so that the images of a batch do not interact.

Every output satisfies ``|x' - x| <= eps/255`` and ``0 <= x' <= 1``; with
``quantize=True`` (default) it is also rounded to the 8-bit grid, as an uploaded
image would be (exact on the grid when ``x`` is 8-bit and ``eps`` an integer).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def quantize_8bit(x: jax.Array) -> jax.Array:
  """Rounds [0, 1] images to the nearest of the 256 levels k/255."""
  return jnp.round(x * 255.0) / 255.0


def project_linf(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """Projects onto {x' : |x' - x|_inf <= eps/255} intersected with [0, 1]^n."""
  e = eps / 255.0
  return jnp.clip(x_adv, jnp.maximum(x - e, 0.0), jnp.minimum(x + e, 1.0))


def _finish(x_adv, x, eps, quantize):
  if quantize:
    x_adv = quantize_8bit(x_adv)
  return project_linf(x_adv, x, eps)


def fgsm(loss_fn: Callable[[jax.Array], jax.Array], images: jax.Array, *, eps: float,
         quantize: bool = True, key: jax.Array | None = None) -> jax.Array:
  """Fast Gradient Sign Method: ``x' = clip(x + eps * sign(grad_x loss), 0, 1)``.

  With a ``key`` it is R+FGSM (Tramer et al. 2018): a random sign step of eps/2 first,
  then the gradient-sign step of eps/2 from there (for objectives whose gradient vanishes
  at the clean image, such as a distance to the clean features).

  Args:
    loss_fn: images [B, H, W, 3] float32 -> scalar or [B] to maximise.
    images: float32 [B, H, W, 3] in [0, 1].
    eps: L-inf radius in 1/255 units.
    quantize: round the result to 8 bits (then re-project).
    key: PRNG key of R+FGSM's random step (None = plain FGSM).

  Returns:
    float32 [B, H, W, 3], inside the eps-ball of ``images`` and [0, 1].
  """
  grad = jax.grad(lambda x: jnp.mean(loss_fn(x)))
  if key is None:
    g = grad(images)
    return _finish(images + (eps / 255.0) * jnp.sign(g), images, eps, quantize)
  half = 0.5 * eps / 255.0
  x0 = project_linf(images + half * jnp.sign(jax.random.normal(key, images.shape)), images, eps)
  return _finish(x0 + half * jnp.sign(grad(x0)), images, eps, quantize)


def pgd(loss_fn: Callable[..., jax.Array], images: jax.Array, *, eps: float,
        alpha: float, steps: int, key: jax.Array | None = None, random_start: bool = True,
        quantize: bool = True, keep_best: bool = True, loss_key: jax.Array | None = None,
        return_curve: bool = False, unroll: bool | None = None):
  """Projected Gradient Descent (ascent on ``loss_fn``), L-inf.

  ``x_0 = x + U(-eps, eps)`` (if ``random_start``), then ``steps`` times
  ``x_{t+1} = Proj(x_t + alpha * sign(grad loss(x_t)))`` with ``jax.lax.fori_loop``.

  On a CPU backend the loop is unrolled (``unroll=None``): XLA's CPU runtime computes the
  input gradient of a convolution inside a while loop several times slower than the same
  gradient outside one (``benchmarks/xla_cpu_conv_in_loop_repro.py``), which PGD through
  the CPU preset's denoiser feels. Unrolling gives the same iterates and compiles faster
  there.

  Args:
    loss_fn: images -> scalar, or [B] per-image losses, to maximise; with ``loss_key``,
      ``(images, key) -> ...`` (a stochastic loss, e.g. EOT over a random defence: step t
      gets ``fold_in(loss_key, t)``, the final comparison ``fold_in(loss_key, steps)``).
    images: float32 [B, H, W, 3] in [0, 1].
    eps: L-inf radius, 1/255 units.
    alpha: step size, 1/255 units.
    steps: number of gradient steps (static).
    key: PRNG key of the random start (required when ``random_start``).
    random_start: start from a uniform point of the eps-ball.
    quantize: round the result to 8 bits (then re-project).
    keep_best: return the iterate with the highest loss seen instead of the last one (per
      image when ``loss_fn`` gives per-image losses, else for the whole batch); the
      attacked loss then never decreases with more steps.
    loss_key: PRNG key of a stochastic ``loss_fn`` (see above).
    return_curve: also return the mean loss at every iterate, float32 [steps + 1].
    unroll: unroll the ``steps`` iterations into straight-line code (True) or keep a
      while loop (False); None = unroll where ``jax.default_backend()`` is the CPU.

  Returns:
    float32 [B, H, W, 3], inside the eps-ball of ``images`` and [0, 1] (and the curve).

  Raises:
    ValueError: ``random_start`` without a ``key``.
  """
  e = eps / 255.0
  if random_start:
    if key is None:
      raise ValueError("pgd(random_start=True) needs a PRNG key")
    x0 = project_linf(images + jax.random.uniform(key, images.shape, images.dtype, -e, e),
                      images, eps)
  else:
    x0 = images
  if loss_key is None:
    losses_at = lambda x, t: loss_fn(x)
  else:
    losses_at = lambda x, t: loss_fn(x, jax.random.fold_in(loss_key, t))

  def mean_and_losses(x, t):
    losses = losses_at(x, t)
    return jnp.mean(losses), losses

  value_and_grad = jax.value_and_grad(mean_and_losses, has_aux=True)
  shape = jax.eval_shape(lambda x: losses_at(x, 0), x0).shape  # () or (B,).
  expand = lambda v: v.reshape(v.shape + (1,) * (images.ndim - v.ndim))

  def body(t, carry):
    x, best_x, best_loss, curve = carry
    (mean, loss), g = value_and_grad(x, t)
    better = loss > best_loss
    best_x = jnp.where(expand(better), x, best_x)
    best_loss = jnp.where(better, loss, best_loss)
    x = project_linf(x + (alpha / 255.0) * jnp.sign(g), images, eps)
    return x, best_x, best_loss, curve.at[t].set(mean)

  init = (x0, x0, jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(steps + 1, jnp.float32))
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  x, best_x, best_loss, curve = jax.lax.fori_loop(0, steps, body, init, unroll=bool(unroll))
  last_loss = losses_at(x, steps)
  curve = curve.at[steps].set(jnp.mean(last_loss))
  if keep_best:
    x = jnp.where(expand(last_loss >= best_loss), x, best_x)
  out = _finish(x, images, eps, quantize)
  return (out, curve) if return_curve else out
