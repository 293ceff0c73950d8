"""``taamr``: TAaMR (Di Noia et al. 2020): a targeted attack on the backbone's ImageNet
classifier, pushing the photo to be classified as the class of a popular category:
maximise ``log softmax(logits(x'))[target]`` (targeted cross-entropy, minimised). Needs a
backbone with a classifier head ('logits'); the target class is a per-catalogue constant
(:mod:`jaxvars.evaluation.targeted` takes the majority top-1 class of the most popular
category's photos)."""

from __future__ import annotations

import jax

from jaxvars.attacks.objectives import OBJECTIVES, AttackContext, Objective


def _loss(ctx: AttackContext, images: jax.Array) -> jax.Array:
  if ctx.logits is None:
    raise ValueError("the 'taamr' objective needs a backbone with an ImageNet classifier "
                     "head (e.g. config.backbone.arch='efficientnet_lite0')")
  logp = jax.nn.log_softmax(ctx.logits(images), axis=-1)
  return logp[:, ctx.constants["target_class"]]


OBJECTIVES.register("taamr", Objective(
    loss=_loss, needs_logits=True,
    description="TAaMR: targeted cross-entropy towards a popular category's ImageNet class"))
