"""Self-supervised pretraining of the backbone on the catalogue's photos (SimCLR).

SimCLR (Chen et al. 2020): two random views per image (:mod:`jaxvars.training.augment`),
the backbone in train mode (BatchNorm statistics over the global batch: the batch is
sharded over the mesh, so they are synchronised by construction) and a projection head,
NT-Xent loss, AdamW with warmup + cosine decay; one jitted step sharded over the ``data``
axis; Orbax checkpoints per epoch under ``<workdir>/checkpoints/pretrain``. The backbone
is exported to ``<workdir>/backbone`` (``--config.backbone.init=self_supervised:<workdir>``).
The ``pretrain`` task that runs it and measures the result is :mod:`jaxvars.run_pretrain`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from jaxvars import checkpointing, distributed, fs, losses, sharding, workdir as wd
from jaxvars.backbones import build_backbone
from jaxvars.defenses.detector import ProjectionHead
from jaxvars.pixels import to_float
from jaxvars.progress import progress
from jaxvars.training.augment import simclr_view
from jaxvars.training.common import check_finite

BACKBONE_DIR = "backbone"


class PretrainState(train_state.TrainState):
  """Train state with the backbone's BatchNorm statistics."""
  batch_stats: Any = None


def make_pretrain_step(backbone, head, mesh, *, temperature: float, min_area: float,
                       jitter: float, jitter_prob: float):
  """Jits one SimCLR step: ``step(state, images_uint8 [B, S, S, 3], key) -> (state, metrics)``.

  The batch is sharded on ``data``; the state is replicated and donated.
  """

  def step(state, images, key):
    x = to_float(images)
    b = x.shape[0]
    keys = jax.random.split(key, 2 * b)
    views = jnp.concatenate([simclr_view(x, keys[:b], min_area=min_area, jitter=jitter,
                                         jitter_prob=jitter_prob),
                             simclr_view(x, keys[b:], min_area=min_area, jitter=jitter,
                                         jitter_prob=jitter_prob)])

    def loss_fn(params):
      out, updates = backbone.apply({"params": params["backbone"],
                                     "batch_stats": state.batch_stats}, views, train=True,
                                    mutable=["batch_stats"])
      z = head.apply({"params": params["head"]}, out["pooled"])
      loss = losses.nt_xent(z1=z[:b], z2=z[b:], temperature=temperature)
      positive = jnp.mean(jnp.sum(z[:b] * z[b:], axis=-1))
      return loss, (updates["batch_stats"], {"loss": loss, "positive_cosine": positive})

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def pretrain(config, data, mesh, workdir: str):
  """Runs SimCLR on ``data.images``; returns (backbone, exported variables, history, timing)."""
  p = config.pretrain
  sharding.check_divisible(p.batch_size, mesh, "config.pretrain.batch_size")
  s = config.data.image_size
  backbone = build_backbone(config.backbone)
  head = ProjectionHead(hidden=p.head_hidden, out=p.head_dim)
  k_b, k_h, k_steps = jax.random.split(jax.random.key(config.seed), 3)
  variables = backbone.init(k_b, jnp.zeros((1, s, s, 3)))
  params = {"backbone": variables["params"],
            "head": head.init(k_h, jnp.zeros((1, backbone.feature_dim)))["params"]}
  n = data.num_items
  steps_per_epoch = max(1, n // p.batch_size)
  total = steps_per_epoch * p.epochs
  schedule = optax.warmup_cosine_decay_schedule(0.0, p.lr, steps_per_epoch * p.warmup_epochs,
                                                max(total, steps_per_epoch * p.warmup_epochs + 1))
  state = distributed.put(PretrainState.create(apply_fn=None, params=params,
                                              tx=optax.adamw(schedule, weight_decay=p.weight_decay),
                                              batch_stats=variables["batch_stats"]),
                         sharding.replicated(mesh))
  mgr = checkpointing.manager(wd.checkpoint_dir(workdir, "pretrain"),
                              max_to_keep=config.checkpoint.max_to_keep)
  start, tree = checkpointing.resume(mgr, {"state": state})
  state = tree["state"]
  if start:
    logging.info("pretrain: resuming from step %d of %d", start, total)
  step_fn = make_pretrain_step(backbone, head, mesh, temperature=p.temperature,
                               min_area=p.min_area, jitter=p.jitter, jitter_prob=p.jitter_prob)
  history, metrics, t0 = [], [], time.perf_counter()
  images_seen = 0
  deadline = t0 + 60.0 * p.max_minutes if p.max_minutes else None
  bar = progress(range(start, total), desc="SimCLR steps", total=total, initial=start)
  step = start
  for step in bar:
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, 3000, epoch]).permutation(n)
    items = np.sort(order[k * p.batch_size:(k + 1) * p.batch_size])
    batch = sharding.shard_batch(data.images[items], mesh)
    state, m = step_fn(state, batch, jax.random.fold_in(k_steps, step))
    metrics.append(m)
    images_seen += p.batch_size
    out_of_time = deadline is not None and time.perf_counter() > deadline
    if k == steps_per_epoch - 1 or out_of_time:
      got = jax.device_get(metrics)
      check_finite([g["loss"] for g in got], where=f"SimCLR (epoch {epoch + 1})",
                   advice=f"lower config.pretrain.lr (now {p.lr})",
                   latest_checkpoint=mgr.latest_step())
      row = {key: float(np.mean([g[key] for g in got])) for key in got[0]}
      row.update(epoch=epoch + 1, step=step + 1)
      history.append(row)
      logging.info("pretrain epoch %d/%d loss=%.4f positive_cosine=%.3f", epoch + 1, p.epochs,
                   row["loss"], row["positive_cosine"])
      bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
      checkpointing.save(mgr, step + 1, {"state": state})
      metrics = []
    if out_of_time:
      logging.warning("pretrain: stopped after %.1f minutes (config.pretrain.max_minutes) at "
                      "step %d of %d; run again to resume", p.max_minutes, step + 1, total)
      break
  mgr.close()
  elapsed = time.perf_counter() - t0
  exported = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
  export_dir = fs.join(workdir, BACKBONE_DIR)
  if fs.isdir(export_dir) and distributed.is_main():  # One process removes it.
    fs.rmtree(export_dir)
  distributed.barrier("jaxvars.pretrain export")
  checkpointing.save_tree(export_dir, jax.device_get(exported))
  timing = {"pretrain_s": elapsed, "pretrain_steps": int(state.step) - start,
            "pretrain_images_per_s": images_seen / max(elapsed, 1e-9),
            "pretrain_completed_steps": int(state.step), "pretrain_total_steps": total}
  return backbone, exported, history, timing
