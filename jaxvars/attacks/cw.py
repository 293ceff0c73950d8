"""Carlini & Wagner's L2 attack (C&W; Carlini and Wagner, "Towards Evaluating the Robustness
of Neural Networks", IEEE S&P 2017, section VI.A, with the change of variables of V.B and
the objective f_6 of V.A; their reference code github.com/carlini/nn_robust_attacks,
``l2_attack.py``), for any per-image ``loss_fn``.

C&W looks for the *smallest* L2 perturbation that makes an image adversarial, rather than
the most damaging one within a budget (FGSM, PGD: :mod:`jaxvars.attacks.linf`). Per image:

* change of variables (section V.B): the attacked image is
  ``x' = lo + (hi - lo) * (tanh(w) + 1) / 2`` with ``[lo, hi]`` the box of allowed pixel
  values, so ``x'`` stays in it for every ``w``: ``[0, 1]`` (the paper's box) or, with an
  L-inf cap ``eps`` < 255, ``[max(x - eps/255, 0), min(x + eps/255, 1)]`` (the eps-ball
  inside [0, 1]; ``eps=255`` is no cap: the ball then holds the whole [0, 1] box).
  ``w`` starts at the clean image, ``arctanh((2 (x - lo) / (hi - lo) - 1) * 0.999999)``
  (the reference's 0.999999 keeps it finite at the box's edges).
* objective (f_6 with confidence kappa, section VI.A): Adam on
  ``||x' - x||_2^2 + c * max(kappa - v(x'), 0)`` where ``v = loss_fn`` is what the attacker
  raises and the image counts as adversarial where ``v(x') > kappa``. For a classifier
  ``v = Z_t - max_{i != t} Z_i`` (targeted) gives the paper's
  ``f_6 = max(max_{i != t} Z_i - Z_t, -kappa)`` up to the constant kappa (the reference's
  form); what ``v`` is for each attack objective is :func:`jaxvars.attacks.objectives.cw_value`'s
  business.
* binary search over c, per image (the reference's): ``binary_search_steps`` runs of
  ``steps`` Adam steps, each from the clean image with a fresh Adam state; c starts at
  ``initial_c``; after a run that found an adversarial iterate, ``upper = min(upper, c)``
  and c bisects ``(lower + upper) / 2``; after one that did not, ``lower = max(lower, c)``
  and c bisects where an upper bound is known (``upper < 1e9``), else ``c *= 10``. With
  ``binary_search_steps >= 10`` the last run uses ``c = upper`` (the reference's
  ``repeat``; 1e10 where no run succeeded).
* each image keeps its smallest-L2 adversarial iterate over every run; an image for which
  no iterate was adversarial is returned **clean** (the reference returns zeros in its
  [-0.5, 0.5] space there, a grey image), and ``return_trace``'s ``success`` says which.

Adam is ``optax.adam(lr)`` (beta1 0.9, beta2 0.999, epsilon 1e-8: the defaults of the
TensorFlow optimizer the reference uses, whose epsilon sits outside the bias correction).
Differences from the reference: a fixed number of Adam steps per run (jittable: no early
abort, which only saves time); the distance is to ``x`` itself (the reference's is to
``tanh(arctanh(x * 0.999999))``); images in [0, 1] instead of [-0.5, 0.5]; ``v > kappa``
is the success test where the reference takes an argmax (ties count as failures here).

8 bits: with ``quantize=True`` (default) the loss is evaluated at the iterate rounded to
the 8-bit grid (``quantize_8bit``, then clipped into the box), with an identity backward
pass (BPDA), and that rounded image is what is checked for success, measured (L2) and
kept: the returned image is 8-bit and was adversarial *after* quantisation (the check is
not repeated on a different image; ``return_trace``'s ``success`` re-evaluates the loss at
the output). Adam's distance term is on the unrounded iterate (smooth).

Units: images float32 [B, H, W, 3] in [0, 1]; ``eps`` in 1/255 units; L2 in [0, 1] pixel
units over all H * W * 3 values. The photos of a batch must not interact inside
``loss_fn`` (models in eval mode): the binary search is per image.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxvars.attacks.linf import project_linf, quantize_8bit
from jaxvars.conditions import UNBOUNDED  # 255: an L-inf cap of 255/255 is none.

_NO_UPPER = 1e10  # The reference's "no successful c yet" upper bound ...
_KNOWN_UPPER = 1e9  # ... and the test for "an upper bound is known".
_TANH_SCALE = 0.999999  # The reference's arctanh margin (finite w at the box's edges).


def _box(images: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Per-pixel [lo, hi]: the eps-ball of ``images`` inside [0, 1]."""
  e = eps / 255.0
  return jnp.maximum(images - e, 0.0), jnp.minimum(images + e, 1.0)


def cw_l2(loss_fn: Callable[..., jax.Array], images: jax.Array, *, steps: int,
          binary_search_steps: int = 9, initial_c: float = 1e-3, lr: float = 1e-2,
          kappa: float = 0.0, eps: float = UNBOUNDED, quantize: bool = True,
          loss_key: jax.Array | None = None, unroll: bool | int = 1,
          return_trace: bool = False):
  """Carlini & Wagner's L2 attack with its binary search over c (module docstring).

  Args:
    loss_fn: images float32 [B, H, W, 3] -> float32 [B], the value v each image's attacker
      raises; image b is adversarial where ``v_b > kappa``. With ``loss_key``,
      ``(images, key) -> [B]`` (stochastic, e.g. EOT over a random defence): Adam step t of
      binary-search run s gets ``fold_in(loss_key, s * steps + t)``, the final check
      ``fold_in(loss_key, binary_search_steps * steps)``.
    images: float32 [B, H, W, 3] in [0, 1].
    steps: Adam steps per binary-search run (static).
    binary_search_steps: runs of the binary search over c (static).
    initial_c: c of the first run, > 0.
    lr: Adam's learning rate (in tanh space).
    kappa: confidence, >= 0, in the units of ``loss_fn``.
    eps: L-inf cap in 1/255 units (the box of the change of variables); 255 = none.
    quantize: evaluate, keep and return 8-bit iterates (module docstring).
    loss_key: PRNG key of a stochastic ``loss_fn``.
    unroll: ``jax.lax.fori_loop``'s ``unroll`` of the Adam loop (the binary search is
      never unrolled). XLA's CPU runtime is slow on convolution input gradients inside a
      loop (:func:`jaxvars.attacks.linf.pgd`); C&W's hundreds of steps cannot be unrolled
      whole, so it keeps the loop by default.
    return_trace: also return a dict of diagnostics: ``'c'`` float32 [S, B] the c of each
      run, ``'found'`` bool [S, B] whether that run found an adversarial iterate, ``'l2'``
      float32 [B] the L2 norm of the output's perturbation, ``'success'`` bool [B]
      ``loss_fn(output) > kappa`` re-evaluated on the returned image.

  Returns:
    float32 [B, H, W, 3] in the box (on the 8-bit grid with ``quantize`` where ``images``
    is and ``eps`` is an integer): per image its smallest-L2 adversarial iterate, or the
    clean image where none was found (then 8-bit rounded with ``quantize``); and the trace.

  Raises:
    ValueError: ``steps`` or ``binary_search_steps`` < 1, ``initial_c`` <= 0 or
      ``kappa`` < 0.
  """
  if steps < 1 or binary_search_steps < 1:
    raise ValueError(f"cw_l2 needs steps >= 1 and binary_search_steps >= 1; got {steps} "
                     f"and {binary_search_steps}")
  if not initial_c > 0 or not kappa >= 0:
    raise ValueError(f"cw_l2 needs initial_c > 0 and kappa >= 0; got {initial_c} and {kappa}")
  b = images.shape[0]
  expand = lambda v: v.reshape((b,) + (1,) * (images.ndim - 1))
  sq_dist = lambda z: jnp.sum(jnp.square(z - images).reshape(b, -1), axis=1)
  lo, hi = _box(images, eps)
  width = jnp.maximum(hi - lo, 1e-12)
  w0 = jnp.arctanh(jnp.clip(2.0 * (images - lo) / width - 1.0, -1.0, 1.0) * _TANH_SCALE)
  to_image = lambda w: lo + (hi - lo) * (jnp.tanh(w) + 1.0) / 2.0

  def seen(x):  # What the loss sees, is checked and kept: the (8-bit) image.
    if not quantize:
      return x
    xq = project_linf(quantize_8bit(x), images, eps)
    return x + jax.lax.stop_gradient(xq - x)  # BPDA: identity backward.

  def value_at(x, t):
    return loss_fn(x) if loss_key is None else loss_fn(x, jax.random.fold_in(loss_key, t))

  def objective(w, c, t):
    x = to_image(w)
    xs = seen(x)
    v = value_at(xs, t)
    total = jnp.sum(sq_dist(x) + c * jnp.maximum(kappa - v, 0.0))
    return total, (v, jax.lax.stop_gradient(xs))

  grad = jax.grad(objective, has_aux=True)
  adam = optax.adam(lr)
  kappa = jnp.float32(kappa)

  def run(s, carry):
    c, lower, upper, best_l2, best_x, trace_c, trace_found = carry
    if binary_search_steps >= 10:  # The reference's repeat: the last run at the upper bound.
      c = jnp.where(s == binary_search_steps - 1, upper, c)

    def step(t, inner):
      w, opt, found, best_l2, best_x = inner
      g, (v, xs) = grad(w, expand(c), s * steps + t)
      ok = v > kappa
      l2 = sq_dist(xs)
      better = ok & (l2 < best_l2)
      best_x = jnp.where(expand(better), xs, best_x)
      best_l2 = jnp.where(better, l2, best_l2)
      updates, opt = adam.update(g, opt, w)
      return optax.apply_updates(w, updates), opt, found | ok, best_l2, best_x

    inner = (w0, adam.init(w0), jnp.zeros(b, bool), best_l2, best_x)
    _, _, found, best_l2, best_x = jax.lax.fori_loop(0, steps, step, inner, unroll=unroll)
    trace_c, trace_found = trace_c.at[s].set(c), trace_found.at[s].set(found)
    upper = jnp.where(found, jnp.minimum(upper, c), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, c))
    known = upper < _KNOWN_UPPER
    c = jnp.where(known, (lower + upper) / 2.0, jnp.where(found, c, 10.0 * c))
    return c, lower, upper, best_l2, best_x, trace_c, trace_found

  init = (jnp.full(b, initial_c, jnp.float32), jnp.zeros(b, jnp.float32),
          jnp.full(b, _NO_UPPER, jnp.float32), jnp.full(b, jnp.inf, jnp.float32),
          seen(images), jnp.zeros((binary_search_steps, b), jnp.float32),
          jnp.zeros((binary_search_steps, b), bool))
  _, _, _, best_l2, best_x, trace_c, trace_found = jax.lax.fori_loop(
      0, binary_search_steps, run, init)
  out = jnp.where(expand(jnp.isfinite(best_l2)), best_x, seen(images))
  if not return_trace:
    return out
  final = value_at(out, binary_search_steps * steps)
  trace = {"c": trace_c, "found": trace_found, "l2": jnp.sqrt(sq_dist(out)),
           "success": final > kappa}
  return out, trace
