"""Pure step functions, jitted over the device mesh by train.py.

``make_bpr_step`` returns ``step(state, batch, features) -> (state, metrics)``:
one Optax update of VBPR on a batch of BPR triplets. The batch is split over
the mesh's ``data`` axis, parameters and the item feature table are replicated;
the same function runs unchanged on 1 or N devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.training import train_state

from jaxvars import losses, sharding
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
