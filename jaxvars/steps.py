"""Pure step functions, jitted over the device mesh by train.py.

``make_bpr_step`` returns ``step(state, batch, features) -> (state, metrics)``:
one Optax update of VBPR on a batch of BPR triplets. The batch is split over
the mesh's ``data`` axis, parameters and the item feature table are replicated;
the same function runs unchanged on 1 or N devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxvars import losses, sharding
from jaxvars.attacks import fgsm, pgd
from jaxvars.attacks.objectives import item_bpr_loss
from jaxvars.models.vbpr import VBPR

TrainState = train_state.TrainState


def bpr_objective(params, batch, features, *, model: VBPR, reg: float, reg_visual: float):
  """VBPR's BPR objective on a batch of triplets (paper eq. for L_bpr).

  Args:
    params: VBPR parameters.
    batch: {'user', 'pos', 'neg'}: int32 [B] triplets (u, i, j).
    features: float32 [I, F], normalised item features f.
    reg, reg_visual: L2 weights (config vbpr.reg, vbpr.reg_visual).

  Returns:
    (loss, metrics): float32 scalar = mean BPR + reg * rows + reg_visual * ||E||^2, and
    {'loss', 'bpr', 'pairwise_accuracy'} (fraction of triplets with x_ui > x_uj).
  """
  variables = {"params": params}
  u, i, j = batch["user"], batch["pos"], batch["neg"]
  x_ui = model.apply(variables, u, i, features[i])
  x_uj = model.apply(variables, u, j, features[j])
  bpr = losses.bpr(pos_scores=x_ui, neg_scores=x_uj)
  rows, visual = model.apply(variables, u, i, j, method=VBPR.l2_penalty)
  loss = bpr + reg * rows + reg_visual * visual
  return loss, {"loss": loss, "bpr": bpr, "pairwise_accuracy": jnp.mean(x_ui > x_uj)}


def make_bpr_step(model: VBPR, mesh, *, reg: float, reg_visual: float):
  """Jits one BPR update sharded over ``mesh`` (batch on ``data``, the rest replicated).

  Returns:
    step(state: TrainState, batch: dict of int32 [B], features: float32 [I, F]) ->
    (new_state, metrics dict of float32 scalars). ``state`` is donated.
  """

  def step(state: TrainState, batch, features):
    grad_fn = jax.grad(bpr_objective, has_aux=True)
    grads, metrics = grad_fn(state.params, batch, features, model=model, reg=reg,
                             reg_visual=reg_visual)
    return state.apply_gradients(grads=grads), metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------
# The joint defence step (paper section 3.5, eq. 12; training recipe of 4.3).
# ---------------------------------------------------------------------------

LOSS_TERMS = ("content", "perceptual", "contrastive", "bpr")
PARAM_GROUPS = ("vbpr", "denoiser", "detector")
INPUT_KINDS = ("clean", "fgsm", "pgd")


def stage_optimizer(trainable, lr: float) -> optax.GradientTransformation:
  """Adam on the parameter groups in ``trainable``; every other group frozen.

  The mask is ``optax.multi_transform`` over the top-level groups of
  ``params = {'vbpr', 'denoiser', 'detector'}``; frozen groups get
  ``optax.set_to_zero()``, so under jit their gradients are never computed.
  """
  unknown = set(trainable) - set(PARAM_GROUPS)
  if unknown:
    raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; expected {PARAM_GROUPS}")

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "train" if k in trainable else "freeze", v)
            for k, v in params.items()}

  return optax.multi_transform({"train": optax.adam(lr), "freeze": optax.set_to_zero()}, labels)


def craft_item_attack(system, vbpr_params, consts, images, items, triplets, *, kind: str,
                      eps: float, pgd_steps: int = 10, pgd_alpha: float = 2.0, key=None,
                      random_start: bool = True):
  """The untargeted VARS attack (paper eq. 3) on a batch of item images.

  Args:
    system: VisualRecommender. vbpr_params: the attacked VBPR's parameters (frozen).
    consts: {'backbone', 'stats', 'features'}.
    images: float32 [B, H, W, 3] in [0, 1]; items: int32 [B]; triplets: ``item_triplets``.
    kind: 'fgsm' or 'pgd'. eps, pgd_alpha: 1/255 units. key: PGD random start.

  Returns:
    float32 [B, H, W, 3], 8-bit quantised, inside the eps-ball and [0, 1].
  """
  score_fn = system.score_fn(jax.lax.stop_gradient(vbpr_params))

  def loss_fn(x):
    return item_bpr_loss(system.features(consts, x), items=items, triplets=triplets,
                         score_fn=score_fn, other_features=consts["features"])

  if kind == "fgsm":
    return fgsm(loss_fn, images, eps=eps)
  if kind == "pgd":
    return pgd(loss_fn, images, eps=eps, alpha=pgd_alpha, steps=pgd_steps, key=key,
               random_start=random_start)
  raise ValueError(f"attack kind {kind!r} is not 'fgsm' or 'pgd'")


def defense_objective(params, consts, batch, x_adv, is_adv, *, system, weights: dict,
                      temperature: float):
  """The joint loss ``w_c L_content + l1 L_perceptual + l2 L_contrastive + l3 L_bpr``.

  Args:
    params: {'vbpr', 'denoiser', 'detector'}. consts: {'backbone', 'stats', 'features'}.
    batch: {'images' uint8 [B, H, W, 3], 'items' int32 [B], 'triplets' dict of [B, T]}.
    x_adv: float32 [B, H, W, 3], the (possibly adversarial) inputs (= clean when is_adv=0).
    is_adv: float32 scalar, 1 when ``x_adv`` is adversarial (the contrastive term needs it).
    weights: {term: weight} for the terms in LOSS_TERMS to compute (others skipped).
    temperature: InfoNCE temperature.

  Returns:
    (loss, metrics dict).
  """
  x = batch["images"].astype(jnp.float32) / 255.0
  b = x.shape[0]
  denoised = system.denoise(params, jnp.concatenate([x, x_adv]))
  d_clean, d_adv = denoised[:b], denoised[b:]
  out = system.backbone_out(consts, jnp.concatenate([x, d_clean, x_adv, d_adv]))
  maps = {k: v for k, v in out.items() if k.startswith("stage")}
  pooled = out["pooled"]
  metrics = {}
  loss = 0.0
  if "content" in weights:
    metrics["content"] = losses.content(clean=x, denoised=d_adv) + losses.content(
        clean=x, denoised=d_clean)
  if "perceptual" in weights:
    metrics["perceptual"] = losses.perceptual(
        clean_maps={k: jax.lax.stop_gradient(v[:b]) for k, v in maps.items()},
        denoised_maps={k: v[3 * b:] for k, v in maps.items()})
  if "contrastive" in weights:
    z = system.embed_pooled(params, pooled)
    pos, neg = losses.detector_pair_similarities(
        z_clean=z[:b], z_clean_denoised=z[b:2 * b], z_adv=z[2 * b:3 * b], z_adv_denoised=z[3 * b:])
    metrics["contrastive"] = is_adv * losses.info_nce(pos_sim=pos, neg_sim=neg,
                                                      temperature=temperature)
    dist = lambda u, v: jnp.mean(jnp.linalg.norm(u - v, axis=-1))
    metrics["score_clean"] = dist(z[:b], z[b:2 * b])
    metrics["score_adv"] = dist(z[2 * b:3 * b], z[3 * b:])
  if "bpr" in weights:
    metrics["bpr"] = item_bpr_loss(system.normalize(consts, pooled[3 * b:]), items=batch["items"],
                                   triplets=batch["triplets"],
                                   score_fn=system.score_fn(params["vbpr"]),
                                   other_features=consts["features"])
  for term, w in weights.items():
    loss = loss + w * metrics[term]
  metrics["loss"] = loss
  return loss, metrics


def make_defense_step(system, mesh, *, weights: dict, mix, attack: dict, temperature: float):
  """Jits one joint step: craft inputs, denoise, four losses, masked Optax update.

  Each step draws the kind of its inputs (clean / FGSM / PGD) with probabilities
  proportional to ``mix`` (paper 4.3: "a random number generator determines which
  type of input is used in one iteration"), crafts them against the current, frozen
  VBPR inside the step, and applies the stage's optimizer (see ``stage_optimizer``).

  Args:
    system: VisualRecommender.
    weights: {term: weight} of the terms to use (zero-weight terms are not computed).
    mix: (clean, fgsm, pgd) proportions.
    attack: {'eps', 'pgd_steps', 'pgd_alpha', 'random_start'} (eps, alpha in 1/255 units),
      optionally 'eps_choices' (a tuple: each step draws its eps uniformly from it) with
      'pgd_alpha_ratio' (> 0: PGD's step is ratio * the drawn eps, else 'pgd_alpha').
    temperature: InfoNCE temperature.

  Returns:
    step(state, batch, consts, key) -> (state, metrics); batch sharded on ``data``,
    state and consts replicated; ``state`` is donated.
  """
  weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
  unknown = set(weights) - set(LOSS_TERMS)
  if unknown:
    raise ValueError(f"unknown loss term(s) {sorted(unknown)}; expected {LOSS_TERMS}")
  probs = jnp.asarray(mix, jnp.float32) / float(sum(mix))

  choices = tuple(float(e) for e in attack.get("eps_choices", ()) or ())
  ratio = float(attack.get("pgd_alpha_ratio", 0.0) or 0.0)

  def step(state, batch, consts, key):
    k_kind, k_pgd, k_eps = jax.random.split(key, 3)
    kind = jax.random.choice(k_kind, 3, p=probs)
    if choices:  # A traced eps: one compiled step serves every budget.
      eps = jax.random.choice(k_eps, jnp.asarray(choices, jnp.float32))
      alpha = ratio * eps if ratio > 0 else attack["pgd_alpha"]
    else:
      eps, alpha = attack["eps"], attack["pgd_alpha"]
    x = batch["images"].astype(jnp.float32) / 255.0
    craft = functools.partial(craft_item_attack, system, state.params["vbpr"], consts, x,
                              batch["items"], batch["triplets"], eps=eps,
                              pgd_steps=attack["pgd_steps"], pgd_alpha=alpha,
                              key=k_pgd, random_start=attack["random_start"])
    branches = [lambda: x, lambda: craft(kind="fgsm"), lambda: craft(kind="pgd")]
    # Kinds with zero probability are never traced into the step.
    for k, p in enumerate(mix):
      if not p:
        branches[k] = lambda: x
    x_adv = jax.lax.stop_gradient(jax.lax.switch(kind, branches))
    is_adv = (kind > 0).astype(jnp.float32)
    grads, metrics = jax.grad(defense_objective, has_aux=True)(
        state.params, consts, batch, x_adv, is_adv, system=system, weights=weights,
        temperature=temperature)
    metrics["input_kind"] = kind
    metrics["input_eps"] = jnp.asarray(eps, jnp.float32) * (kind > 0)
    return state.apply_gradients(grads=grads), metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))
