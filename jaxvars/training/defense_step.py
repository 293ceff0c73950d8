"""The joint defence step (paper section 3.5, eq. 12; training recipe of 4.3).

``make_defense_step`` returns one jitted, mesh-sharded update that crafts its inputs
(clean, FGSM or PGD, drawn per step), denoises clean and adversarial images and applies
the stage's masked Optax update to ``content + l1 perceptual + l2 contrastive + l3 bpr``.
Every defence stage of ``config.stages`` is this step with its own trainable groups,
input mix and loss terms. ``config.defense.bpr_other`` (:data:`BPR_OTHER`) decides whether
the BPR term scores the other item of each triplet with its clean feature f(x_j) or with
f(D(x_j)), its photo (carried in the batch) through the same denoiser (docs/running.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvars import losses, sharding
from jaxvars.attacks.objectives.bpr import item_bpr_loss
from jaxvars.attacks.spec import AttackSpec
from jaxvars.backbones import PERCEPTUAL_MAPS
from jaxvars.defenses.detector import detection_score
from jaxvars.models import PARAM_GROUPS
from jaxvars.pixels import to_float

LOSS_TERMS = ("content", "perceptual", "contrastive", "bpr")  # config.stages.<stage>.terms
# Weights besides the terms': 'content_clean' weights the content term's clean inputs apart.
EXTRA_WEIGHTS = ("content_clean",)


def loss_weights(loss_config, terms) -> dict:
  """{weight name: value} of a stage's ``terms`` from ``config.loss``: each term's weight,
  and ``content_clean`` where the stage uses the content term and it is set (not None).

  Args:
    loss_config: ``config.loss`` (content, perceptual, contrastive, bpr, content_clean).
    terms: the stage's terms (a subset of LOSS_TERMS).
  """
  weights = {term: float(loss_config[term]) for term in terms}
  if "content" in terms and loss_config.get("content_clean") is not None:
    weights["content_clean"] = float(loss_config["content_clean"])
  return weights
INPUT_KINDS = ("clean", "fgsm", "pgd")  # The order of config.stages.<stage>.mix.
# config.defense.bpr_other: what the BPR term scores the other item of each triplet with.
#   'clean': its clean feature f(x_j), a row of consts['features'] (jaxvars before issue 35).
#   'defended': f(D(x_j)), its photo through the current denoiser inside the step, with the
#     gradient (paper eq. 12: both images of the triplet pass through the defence).
#   'defended_frozen': the same features without their gradient (a forward pass only).
BPR_OTHER = ("clean", "defended", "defended_frozen")
OTHER_IMAGES = "other_images"  # Batch key of the other items' photos (uint8 [B, 2T, H, W, 3]).


def needs_other_images(weights: dict, bpr_other: str) -> bool:
  """Whether a stage's steps need the photos of every triplet's other item in the batch
  (under :data:`OTHER_IMAGES`): the BPR term is used (non-zero weight) and scores the other
  item through the denoiser."""
  return bpr_other != "clean" and bool(weights.get("bpr"))


def other_items(triplets: dict):
  """The other item of every triplet of a batch, int [B, 2T]: the sampled negatives of the
  item's buyers ('pos_negs', [B, T]) then the bought items of its non-buyers ('neg_pos')."""
  return np.concatenate([np.asarray(triplets["pos_negs"]), np.asarray(triplets["neg_pos"])],
                        axis=1)


def stage_optimizer(trainable, lr: float) -> optax.GradientTransformation:
  """Adam on the parameter groups in ``trainable``; every other group frozen.

  The mask is ``optax.multi_transform`` over the top-level groups of ``params``
  (:data:`jaxvars.models.PARAM_GROUPS`); frozen groups get ``optax.set_to_zero()``, so
  under jit their gradients are never computed.

  Raises:
    ValueError: an unknown group.
  """
  unknown = set(trainable) - set(PARAM_GROUPS)
  if unknown:
    raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; expected {PARAM_GROUPS}")

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "train" if k in trainable else "freeze", v)
            for k, v in params.items()}

  return optax.multi_transform({"train": optax.adam(lr), "freeze": optax.set_to_zero()}, labels)


def defense_objective(params, consts, batch, x_adv, is_adv, *, models, weights: dict,
                      temperature: float, bpr_other: str = "clean"):
  """The joint loss ``w_c L_content + l1 L_perceptual + l2 L_contrastive + l3 L_bpr``.

  ``L_content`` is ``||x - D(x_adv)||^2 + ||x - D(x)||^2`` (per-pixel means, pixels in
  [0, 1]). With ``weights['content_clean']`` the reconstructions of clean inputs (D(x), and
  D(x_adv) on a clean step) are weighted by it and only an attacked input's by
  ``weights['content']``: D may then rewrite attacked photos while keeping clean ones (the
  same as eq. 12 when the two weights are equal).

  Args:
    params: {'recommender', 'denoiser', 'detector'}. consts: {'backbone', 'stats', 'features'}.
    batch: {'images' uint8 [B, H, W, 3], 'items' int32 [B], 'triplets' dict of [B, T]}, and
      with ``bpr_other`` != 'clean' :data:`OTHER_IMAGES`: uint8 [B, 2T, H, W, 3], the photos
      of :func:`other_items` (the other item of each triplet).
    x_adv: float32 [B, H, W, 3], the (possibly adversarial) inputs (= clean when is_adv=0).
    is_adv: float32 scalar, 1 when ``x_adv`` is adversarial (the contrastive term needs it).
    models: :class:`jaxvars.models.Models`.
    weights: {term: weight} for the terms in LOSS_TERMS to compute (others skipped), and
      optionally 'content_clean' (see above).
    temperature: InfoNCE temperature.
    bpr_other: how ``L_bpr`` scores the other item of each triplet (:data:`BPR_OTHER`):
      'clean' its clean feature f(x_j) (``consts['features']``), 'defended' f(D(x_j)) through
      the current denoiser with the gradient (eq. 12), 'defended_frozen' the same value
      without the gradient through x_j's image.

  Returns:
    (loss, metrics dict).
  """
  x = to_float(batch["images"])
  b = x.shape[0]
  # D runs on x and x_adv even when they are equal (a clean step): choosing one pass with
  # lax.cond made the step several times slower on CPU (XLA's CPU convolutions are slow
  # inside a conditional, as inside loops).
  denoised = models.denoise(params, jnp.concatenate([x, x_adv]))
  d_clean, d_adv = denoised[:b], denoised[b:]
  # The frozen backbone sees only what a term needs, in two passes: the inputs (no
  # parameter reaches them, so no backward pass) and the denoised images (backward pass).
  # The denoiser stages need x and D(x_adv) only, half the images of the joint step.
  frozen_contrastive = "contrastive" in weights and not models.detector_encoder
  fixed = [x, x_adv] if frozen_contrastive else [x]
  moving = [d_clean, d_adv] if frozen_contrastive else [d_adv]
  fixed_out = moving_out = None
  if "perceptual" in weights or frozen_contrastive:
    fixed_out = models.backbone_out(consts, jnp.concatenate(fixed))
  if "perceptual" in weights or "bpr" in weights or frozen_contrastive:
    moving_out = models.backbone_out(consts, jnp.concatenate(moving))
  metrics = {}
  loss = 0.0
  if "content" in weights:
    content_adv = losses.content(clean=x, denoised=d_adv)
    content_clean = losses.content(clean=x, denoised=d_clean)
    metrics["content"] = content_adv + content_clean
  if "perceptual" in weights:
    metrics["perceptual"] = losses.perceptual(
        clean_maps={k: jax.lax.stop_gradient(fixed_out[k][:b]) for k in PERCEPTUAL_MAPS},
        denoised_maps={k: moving_out[k][-b:] for k in PERCEPTUAL_MAPS})
  if "contrastive" in weights:
    frozen_pooled = None
    if frozen_contrastive:  # In the order x, D(x), x_adv, D(x_adv).
      fp, mp = fixed_out["pooled"], moving_out["pooled"]
      frozen_pooled = jnp.concatenate([fp[:b], mp[:b], fp[b:], mp[b:]])
    z = models.embed_pooled(params, models.detector_pooled(
        params, consts, jnp.concatenate([x, d_clean, x_adv, d_adv]),
        frozen_pooled=frozen_pooled))
    pos, neg = losses.detector_pair_similarities(
        z_clean=z[:b], z_clean_denoised=z[b:2 * b], z_adv=z[2 * b:3 * b], z_adv_denoised=z[3 * b:])
    metrics["contrastive"] = is_adv * losses.info_nce(pos_sim=pos, neg_sim=neg,
                                                      temperature=temperature)
    metrics["score_clean"] = jnp.mean(detection_score(z[:b], z[b:2 * b]))
    metrics["score_adv"] = jnp.mean(detection_score(z[2 * b:3 * b], z[3 * b:]))
  if "bpr" in weights:
    other = {"other_features": consts["features"]}
    if bpr_other != "clean":
      other = {"triplet_features": _other_features(params, consts, batch, models=models,
                                                   frozen=bpr_other == "defended_frozen")}
    metrics["bpr"] = jnp.mean(item_bpr_loss(
        models.features_from(consts, {"pooled": moving_out["pooled"][-b:]}, d_adv),
        items=batch["items"],
        triplets=batch["triplets"], score_fn=models.score_fn(params["recommender"]),
        **other))
  for term, w in weights.items():
    if term == "content" and "content_clean" in weights:
      w_clean = weights["content_clean"]
      loss = loss + w * is_adv * content_adv + w_clean * (content_clean
                                                          + (1.0 - is_adv) * content_adv)
    elif term in LOSS_TERMS:
      loss = loss + w * metrics[term]
  metrics["loss"] = loss
  return loss, metrics


def _other_features(params, consts, batch, *, models, frozen: bool) -> dict:
  """{'pos_negs', 'neg_pos': float32 [B, T, F]}: f(D(x)) of the other item of every triplet
  (the photos under :data:`OTHER_IMAGES`), through the current denoiser and the frozen
  backbone; without the gradient through them when ``frozen``.

  Raises:
    KeyError: a batch without :data:`OTHER_IMAGES` (built without ``needs_other_images``).
  """
  if OTHER_IMAGES not in batch:
    raise KeyError(f"config.defense.bpr_other scores the other item of each triplet through D, "
                   f"but the batch has no {OTHER_IMAGES!r} (see needs_other_images)")
  imgs = batch[OTHER_IMAGES]
  b, n = imgs.shape[:2]
  x = to_float(imgs.reshape((b * n,) + imgs.shape[2:]))
  if frozen:
    params = jax.lax.stop_gradient(params)
  f = models.features(consts, models.denoise(params, x)).reshape(b, n, -1)
  t = n // 2
  return {"pos_negs": f[:, :t], "neg_pos": f[:, t:]}


def make_defense_step(models, mesh, *, weights: dict, mix, attack: AttackSpec,
                      eps_choices=(), temperature: float, bpr_other: str = "clean"):
  """Jits one joint step: craft inputs, denoise, four losses, masked Optax update.

  Each step draws the kind of its inputs (clean / FGSM / PGD) with probabilities
  proportional to ``mix`` (paper 4.3: "a random number generator determines which
  type of input is used in one iteration"), crafts them against the current, frozen
  recommender inside the step, and applies the stage's optimizer (see ``stage_optimizer``).

  Args:
    models: :class:`jaxvars.models.Models`.
    weights: {term: weight} of the terms to use (zero-weight terms are not computed), and
      optionally 'content_clean' (:func:`defense_objective`; kept even at 0).
    mix: (clean, fgsm, pgd) proportions.
    attack: the training attack (its eps, steps and step rule; ``method`` is ignored).
    eps_choices: if non-empty, each step draws its eps uniformly from these (1/255; one
      compiled step: eps is traced), and PGD's step follows the drawn eps.
    temperature: InfoNCE temperature.
    bpr_other: ``config.defense.bpr_other`` (:func:`defense_objective`); where it is not
      'clean' and the BPR term is used, every batch needs :data:`OTHER_IMAGES`
      (:func:`needs_other_images`).

  Returns:
    step(state, batch, consts, key) -> (state, metrics); batch sharded on ``data``,
    state and consts replicated; ``state`` is donated.
  """
  if bpr_other not in BPR_OTHER:
    raise ValueError(f"bpr_other={bpr_other!r} is not one of {BPR_OTHER}")
  unknown = set(weights) - set(LOSS_TERMS) - set(EXTRA_WEIGHTS)
  if unknown:
    raise ValueError(f"unknown loss term(s) {sorted(unknown)}; expected {LOSS_TERMS} "
                     f"(and {EXTRA_WEIGHTS})")
  weights = {k: float(v) for k, v in weights.items()}
  w_clean = weights.pop("content_clean", None)
  if "content" not in weights or w_clean == weights["content"]:
    w_clean = None  # The stage has no content term, or eq. 12's single weight.
  weights = {k: v for k, v in weights.items()
             if v != 0.0 or (k == "content" and w_clean)}  # Zero-weight terms skipped.
  if w_clean is not None and "content" in weights:
    weights["content_clean"] = w_clean
  probs = jnp.asarray(mix, jnp.float32) / float(sum(mix))
  choices = tuple(float(e) for e in eps_choices or ())
  specs = {kind: dataclasses.replace(attack, method=kind) for kind in ("fgsm", "pgd")}

  def step(state, batch, consts, key):
    k_kind, k_pgd, k_eps = jax.random.split(key, 3)
    kind = jax.random.choice(k_kind, 3, p=probs)
    eps = (jax.random.choice(k_eps, jnp.asarray(choices, jnp.float32)) if choices
           else attack.eps)
    x = to_float(batch["images"])
    ctx = models.attack_context(state.params["recommender"], consts, batch["items"],
                                batch["triplets"])
    craft = lambda kind_: specs[kind_].run(ctx, x, k_pgd, eps=eps)
    branches = [lambda: x, functools.partial(craft, "fgsm"), functools.partial(craft, "pgd")]
    # Kinds with zero probability are never traced into the step.
    for k, p in enumerate(mix):
      if not p:
        branches[k] = lambda: x
    x_adv = jax.lax.stop_gradient(jax.lax.switch(kind, branches))
    is_adv = (kind > 0).astype(jnp.float32)
    grads, metrics = jax.grad(defense_objective, has_aux=True)(
        state.params, consts, batch, x_adv, is_adv, models=models, weights=weights,
        temperature=temperature, bpr_other=bpr_other)
    metrics["input_kind"] = kind
    metrics["input_eps"] = jnp.asarray(eps, jnp.float32) * (kind > 0)
    return state.apply_gradients(grads=grads), metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))
