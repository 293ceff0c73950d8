"""Attacking every photo of a catalogue (paper eq. 3 by default), cached on disk.

:func:`attack_catalogue` crafts one attack on all item photos in jitted, sharded batches
against the undefended recommender (the paper's threat model: the defence is not known
to the attacker). :func:`cached_attack_catalogue` keeps the result in
``<cache_dir>/<condition>.npy`` with a fingerprint of everything it depends on, so every
system, the ablations and ``--mode=evaluate`` reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging

from jaxvars import atomic, rng as rng_streams
from jaxvars.attacks.spec import METHODS, AttackSpec
from jaxvars.data import splits
from jaxvars.features import batched_map
from jaxvars.pixels import to_float, to_uint8


def perturbation_stats(clean_uint8: np.ndarray, adv_uint8: np.ndarray, chunk: int = 1024) -> dict:
  """Mean per-image L-inf and L2 norms of ``adv - clean`` in [0, 1] pixel units
  (``linf_255`` = L-inf in 1/255 units)."""
  linf, l2 = [], []
  for s in range(0, len(clean_uint8), chunk):
    d = (adv_uint8[s:s + chunk].astype(np.float32) - clean_uint8[s:s + chunk]) / 255.0
    d = d.reshape(len(d), -1)
    linf.append(np.abs(d).max(axis=1))
    l2.append(np.sqrt(np.square(d).sum(axis=1)))
  linf, l2 = np.concatenate(linf), np.concatenate(l2)
  return {"linf": float(linf.mean()), "linf_255": float(linf.mean() * 255), "l2": float(l2.mean())}


def fingerprint(spec: AttackSpec, *, rec_params, consts, image_shape) -> str:
  """A hash of everything an attacked catalogue depends on: the recommender's parameters,
  the item features (hence the backbone and the photos) and the attack spec."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(rec_params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(np.ascontiguousarray(np.asarray(consts["features"][:64])).tobytes())
  h.update(json.dumps([spec.method, spec.objective, spec.eps, list(image_shape), spec.seed,
                       spec.steps, spec.step(), spec.random_start,
                       spec.triplets_per_item]).encode())
  return h.hexdigest()[:20]


def attack_catalogue(spec: AttackSpec, *, models, rec_params, consts, data, mesh,
                     batch_size: int):
  """Attacks every item photo of the catalogue, in jitted sharded batches of ``batch_size``.

  Triplets and random starts come from ``spec.seed`` (and method, eps), so the attacked
  catalogue is the same for every system evaluated on it.

  Returns:
    (uint8 [I, S, S, 3] attacked images, {'linf', 'linf_255', 'l2', 'time_s'}).
  """
  rng = np.random.default_rng([spec.seed, METHODS.names().index(spec.method),
                               int(round(spec.eps * 1000))])
  items = np.arange(data.num_items, dtype=np.int32)
  triplets = {}
  if spec.needs_triplets:
    keys = splits.pair_keys(data.train_users, data.train_items, data.num_items)
    triplets = splits.item_triplets(items, train_users=data.train_users,
                                    train_items=data.train_items, num_users=data.num_users,
                                    num_items=data.num_items, positive_keys=keys,
                                    per_role=spec.triplets_per_item, rng=rng)
  base_key = rng_streams.stream(spec.seed, rng_streams.ATTACK_START)

  @jax.jit
  def craft(batch):
    ctx = models.attack_context(rec_params, consts, batch["items"],
                                {k: batch[k] for k in triplets} or None)
    adv = spec.run(ctx, to_float(batch["images"]), jax.random.fold_in(base_key, batch["items"][0]))
    return to_uint8(adv)

  t = time.perf_counter()
  adv = batched_map(craft, {"images": data.images, "items": items, **triplets},
                    batch_size=batch_size, mesh=mesh, desc=f"{spec.condition} attack")
  elapsed = time.perf_counter() - t
  return adv, {**perturbation_stats(data.images, adv), "time_s": elapsed}


def cached_attack_catalogue(spec: AttackSpec, *, cache_dir: str | None, **kwargs):
  """``attack_catalogue`` whose result is kept in ``cache_dir`` as ``<condition>.npy`` +
  ``.json`` (stats and fingerprint) and loaded, not recomputed, while the fingerprint
  matches (same recommender, backbone, photos and attack). Writes are atomic.

  Returns: as ``attack_catalogue``; the stats gain ``'cached': bool``.
  """
  if not cache_dir:
    adv, stats = attack_catalogue(spec, **kwargs)
    return adv, dict(stats, cached=False)
  images = kwargs["data"].images
  key = fingerprint(spec, rec_params=kwargs["rec_params"], consts=kwargs["consts"],
                    image_shape=images.shape)
  stem = os.path.join(cache_dir, spec.condition)
  try:
    with open(stem + ".json") as f:
      meta = json.load(f)
    if meta.get("fingerprint") == key:
      adv = np.load(stem + ".npy", mmap_mode="r")
      if adv.shape == images.shape and adv.dtype == np.uint8:
        logging.info("%s: attacked catalogue loaded from %s.npy", spec.condition, stem)
        return adv, dict(meta["stats"], cached=True)
  except (OSError, ValueError, KeyError):
    pass
  adv, stats = attack_catalogue(spec, **kwargs)
  os.makedirs(cache_dir, exist_ok=True)
  atomic.write_npy(stem + ".npy", adv)
  atomic.write_json(stem + ".json", {"fingerprint": key, "stats": stats})
  return adv, dict(stats, cached=False)
