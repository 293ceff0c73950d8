"""``taamr``: TAaMR (Di Noia et al. 2020): a targeted attack on the backbone's ImageNet
classifier, pushing the photo to be classified as the class of a popular category:
maximise ``log softmax(logits(x'))[target]`` (targeted cross-entropy, minimised). Needs a
backbone with a classifier head ('logits'); the target class is a per-catalogue constant
(:mod:`jaxvars.evaluation.targeted` takes the majority top-1 class of the most popular
category's photos).

C&W (:mod:`jaxvars.attacks.cw`) uses the classifier's own success criterion, the photo's
top-1 class is the target: its margin is Carlini & Wagner's f_6 on the logits Z,
``max_{i != t} Z_i - Z_t`` (< 0 exactly where the target class is the top-1 class; kappa
in logit units)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def _logits(ctx: AttackContext, images: jax.Array) -> jax.Array:
  if ctx.logits is None:
    raise ValueError("the 'taamr' objective needs a backbone with an ImageNet classifier "
                     "head (e.g. config.backbone.arch='efficientnet_lite0')")
  return ctx.logits(images)


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(_logits(ctx, images), axis=-1)
  return logp[:, ctx.constants["target_class"]]


def target_margin(logits: jax.Array, target) -> jax.Array:
  """C&W's f_6 margin ``max_{i != t} Z_i - Z_t`` per row of ``logits`` float32 [B, C] for
  the target class ``target`` (int, or int [B]); float32 [B]."""
  target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), logits.shape[:1])
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=bool)
  z_t = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return other - z_t


def _margin(ctx: AttackContext, images: jax.Array) -> jax.Array:
  return target_margin(_logits(ctx, images), ctx.constants["target_class"])


OBJECTIVES.register("taamr", Objective(
    loss=_loss, needs_logits=True, margin=_margin,
    description="TAaMR: targeted cross-entropy towards a popular category's ImageNet class"))
