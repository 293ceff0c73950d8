"""Attacking the photos of a catalogue, cached on disk.

:func:`attack_catalogue` crafts one attack on all item photos (or on a subset of items),
in jitted, sharded batches: by default against the undefended recommender (the paper's
threat model: the defence is not known to the attacker), or through a defended system
(``spec.through``: white-box, :mod:`jaxvars.attacks.whitebox`).
:func:`cached_attack_catalogue` keeps the result (an item-subset attack: its own photos only,
not a copy of the whole catalogue) in ``<cache_dir>/<name>.npy`` with a
fingerprint of everything it depends on (the parameters, the feature table and the clean
photos of every item, the attack and its settings), so every system, the ablations and
``--mode=evaluate`` reuse it; its ``.json`` also holds the sha256 of the ``.npy``'s array
bytes, checked on load, so a tampered or truncated cache is crafted again (with a warning
naming the file), never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref

import jax
import numpy as np
from absl import logging

from jaxvars import atomic, fs, rng as rng_streams
from jaxvars.attacks.objectives import OBJECTIVES
from jaxvars.attacks.spec import METHODS, AttackSpec
from jaxvars.attacks.whitebox import attack_loss
from jaxvars.data import splits
from jaxvars.defenses.systems import SYSTEMS
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


def _attacked_params(spec: AttackSpec, params: dict) -> dict:
  """The parameters an attack depends on: the recommender's, and the defence's when it is
  crafted through a defended system."""
  return params if spec.through is not None or spec.detector_lambda > 0 else {
      "recommender": params["recommender"]}


_DIGESTS: dict[int, tuple] = {}  # id(array) -> (weakref to it, digest): this process.


def content_digest(array) -> str:
  """sha256 (hex) of an array's dtype, shape and bytes (a numpy or a jax array), computed
  once per array object in this process (the arrays it is used on, a dataset's photos and
  the feature table, are never written in place): the photos of a catalogue of 16k items
  at 224 px (2.5 GB) take about 2 s once, not once per attack."""
  key = id(array)
  known = _DIGESTS.get(key)
  if known is not None and known[0]() is array:
    return known[1]
  values = np.ascontiguousarray(np.asarray(array))
  h = hashlib.sha256(f"{values.dtype.str}{list(values.shape)}".encode())
  h.update(memoryview(values.reshape(-1)).cast("B"))
  digest = h.hexdigest()
  try:
    ref = weakref.ref(array, lambda _, key=key: _DIGESTS.pop(key, None))
  except TypeError:  # Not weak-referenceable: not remembered.
    return digest
  _DIGESTS[key] = (ref, digest)
  return digest


def fingerprint(spec: AttackSpec, *, params, consts, image_shape, items=None,
                settings: dict | None = None, images=None, table=None,
                dtype: str = "float32") -> str:
  """A hash of everything an attacked catalogue depends on: the parameters it was crafted
  against, the feature table of every item (hence the backbone and the photos), the clean
  photos of every item (``images``, uint8 [I, S, S, 3]: what the attack starts from and what
  the unattacked items keep; :func:`content_digest`), the attack spec, the attacked items,
  the defended system's settings and, where the objective read another item table than the
  clean one (``table``: a system's deployed table, ``config.attack.whitebox_table``), that
  table's content (so a clean-table attack is never served for a deployed-table one), and
  the models' compute dtype (``config.dtype``) where it is not float32 (a float32 attack's
  fingerprint is the one it had before the field existed)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(_attacked_params(spec, params)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(content_digest(consts["features"]).encode())
  if images is not None:
    h.update(content_digest(images).encode())
  if items is not None:
    h.update(np.ascontiguousarray(np.asarray(items, np.int64)).tobytes())
  if table is not None:
    h.update(b"objective_table:" + content_digest(table).encode())
  if dtype != "float32":
    h.update(b"dtype:" + str(dtype).encode())
  h.update(json.dumps([spec.method, spec.objective, spec.eps, list(image_shape), spec.seed,
                       spec.steps, spec.step(), spec.random_start, spec.triplets_per_item,
                       spec.through, spec.eot, spec.restarts, spec.detector_lambda,
                       settings or {}], sort_keys=True, default=str).encode())
  if spec.cw_settings:  # C&W only: FGSM's and PGD's fingerprints are as they were.
    h.update(b"cw:" + json.dumps(spec.cw_settings, sort_keys=True).encode())
  return h.hexdigest()[:20]


def _objective_inputs(spec: AttackSpec, data, items: np.ndarray, rng,
                      constants: dict | None = None) -> tuple[dict, dict]:
  objective = OBJECTIVES.get(spec.objective)
  constants = dict(objective.constants(data, rng) if objective.constants else {},
                   **(constants or {}))
  if objective.batch_inputs is not None:
    return objective.batch_inputs(items, data, rng, spec.triplets_per_item), constants
  if not objective.needs_triplets:
    return {}, constants
  keys = splits.pair_keys(data.train_users, data.train_items, data.num_items)
  return splits.item_triplets(items, train_users=data.train_users, train_items=data.train_items,
                              num_users=data.num_users, num_items=data.num_items,
                              positive_keys=keys, per_role=spec.triplets_per_item,
                              rng=rng), constants


def attack_catalogue(spec: AttackSpec, *, models, params, consts, data, mesh, batch_size: int,
                     config=None, items: np.ndarray | None = None,
                     threshold: float | None = None, constants: dict | None = None,
                     table: np.ndarray | None = None, out: np.ndarray | None = None):
  """Attacks the item photos of the catalogue, in jitted sharded batches of ``batch_size``.

  Objective inputs (triplets) and random starts come from ``spec.seed`` (and method, eps),
  so the attacked catalogue is the same for every system evaluated on it.

  Args:
    spec: the attack. models, params, consts: what it is crafted against.
    config: the run's config (needed for white-box attacks: the system's settings).
    items: attack only these items (the others keep their clean photo); None = all.
    threshold: the deployed detector threshold (detector-aware attacks).
    constants: the objective's constants, overriding its defaults (e.g. TAaMR's class).
    table: the objective's item table (float32 [I, F], or [K, I, F] for a randomised
      system's draws; :func:`jaxvars.attacks.whitebox.attack_loss`), e.g. the attacked
      system's deployed table; None = the clean table ``consts['features']``.
    out: a writable uint8 array of the result's shape (e.g. a memory-mapped ``.npy``) that
      receives the attacked photos batch by batch and is returned (a catalogue larger than
      host memory); None = a new array.

  Returns:
    (uint8 attacked photos: [I, S, S, 3] the whole catalogue where ``items`` is None, else
    [n, S, S, 3] the photos of ``np.sort(items)`` only (the others are the clean photos,
    which are not copied), stats: {'linf', 'linf_255', 'l2' (over the attacked photos),
    'time_s', 'items_attacked', 'loss_curve' (mean loss of the first batch at every
    iterate), 'threat_model', 'objective_table': 'deployed' where ``table`` is given, and
    for C&W 'success_rate': the share of the photos it made adversarial, the others being
    returned clean}).
  """
  attacked = np.arange(data.num_items, dtype=np.int32) if items is None else np.sort(
      np.asarray(items, np.int32))
  rng = np.random.default_rng([spec.seed, METHODS.names().index(spec.method),
                               int(round(spec.eps * 1000))])
  inputs, constants = _objective_inputs(spec, data, attacked, rng, constants)
  base_key = rng_streams.stream(spec.seed, rng_streams.ATTACK_START)

  @jax.jit
  def craft(batch):
    loss_fn, stochastic = attack_loss(
        spec, models=models, params=params, consts=consts, config=config,
        items=batch["items"], inputs={k: batch[k] for k in inputs} or None,
        constants=constants or None, num_users=data.num_users, threshold=threshold,
        table=table)
    adv, curve, success = spec.run_loss(loss_fn, to_float(batch["images"]),
                                        jax.random.fold_in(base_key, batch["items"][0]),
                                        stochastic=stochastic, return_curve=True,
                                        return_success=True)
    out = {"adv": to_uint8(adv), "curve": jax.numpy.broadcast_to(curve, (adv.shape[0],) +
                                                                  curve.shape)}
    if success is not None:  # C&W: the photos it made adversarial (the others stay clean).
      out["success"] = success
    return out

  t = time.perf_counter()
  # The whole catalogue is sliced batch by batch, not copied (a memory map stays on disk).
  clean = data.images if items is None else data.images[attacked]
  out = batched_map(craft, {"images": clean, "items": attacked, **inputs},
                    batch_size=batch_size, mesh=mesh,
                    desc=f"{spec.condition} attack" + (f" on {spec.through}" if spec.through
                                                       else ""),
                    workers=1 if spec.through and SYSTEMS.get(spec.through).host_callback
                    else None,  # One batch at a time through host callbacks (System doc).
                    out=None if out is None else {"adv": out})
  elapsed = time.perf_counter() - t
  stats = {**perturbation_stats(clean, out["adv"]), "time_s": elapsed,
           "items_attacked": int(len(attacked)),
           "loss_curve": [float(v) for v in out["curve"][0]],
           "threat_model": spec.threat_model, "threat": spec.threat_short,
           "objective": spec.objective}
  if "success" in out:
    stats["success_rate"] = float(np.mean(out["success"]))
  if table is not None:  # The report's threat-model legend says so.
    stats["objective_table"] = "deployed"
    stats["threat_model"] += ("; its objective scores the other items with the attacked "
                              "system's deployed features (config.attack.whitebox_table)")
  return out["adv"], stats


_VERIFIED: dict[str, tuple[list, str]] = {}  # .npy path -> (stat key, array sha256).


def _stat_key(path: str) -> list:
  if not fs.is_local(path):  # An object store: size and modification time (seconds).
    size, mtime = fs.stat_signature(path)
    mtime_ns = int(mtime * 1_000_000_000)
    return [size, mtime_ns, mtime_ns, 0, 0]
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


_RACY_NS = 1_000_000_000  # As jaxvars.backbones.weights: a stat trusted 1 s after a change.


def _array_sha256(path: str, adv: np.ndarray) -> str:
  """:func:`content_digest` of a memory-mapped cache, remembered per file stat in this
  process (a catalogue the ablations read again is read once) once the file has not changed
  for a second (a change within one timestamp tick would leave its stat as it was)."""
  key = _stat_key(path)
  known = _VERIFIED.get(path)
  if known is not None and known[0] == key:
    return known[1]
  started = time.time_ns()
  digest = content_digest(adv)
  if started - max(key[1], key[2]) > _RACY_NS:
    _VERIFIED[path] = (key, digest)
  return digest


def _load_cached(stem: str, key: str, shape) -> tuple | None:
  """(memory-mapped catalogue, stats) of the cache at ``stem`` if its fingerprint is ``key``
  and its ``.npy`` is intact (shape, dtype and the sha256 its ``.json`` holds); else None,
  with a warning naming the file where it is damaged rather than just made for other inputs."""
  npy = stem + ".npy"
  try:
    with fs.open(stem + ".json") as f:
      meta = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("%s.json is unreadable (%s); crafting the attack again", stem, e)
    return None
  if not isinstance(meta, dict) or meta.get("fingerprint") != key:
    return None  # Made for other parameters, photos or settings: crafted again.
  problem = None
  try:
    adv = fs.np_load(npy, mmap_mode="r", allow_pickle=False)  # Non-local: read, not mapped.
    if adv.shape != tuple(shape) or adv.dtype != np.uint8:
      problem = f"holds {adv.dtype} {list(adv.shape)}, expected uint8 {list(shape)}"
    elif "array_sha256" not in meta:
      problem = f"has no checksum in {stem}.json (written by an older jaxvars)"
    elif _array_sha256(npy, adv) != meta["array_sha256"]:
      problem = (f"does not match the sha256 in {stem}.json (tampered with or damaged since it "
                 "was crafted)")
    elif "stats" not in meta:
      problem = f"has no stats in {stem}.json"
  except FileNotFoundError:
    problem = "is missing"
  except (OSError, ValueError) as e:  # Truncated (mmap past the end), bad header.
    problem = f"cannot be read ({e})"
  if problem:
    logging.warning("attack cache %s %s; crafting it again", npy, problem)
    return None
  return adv, meta["stats"]


def cached_attack_catalogue(spec: AttackSpec, *, cache_dir: str | None, **kwargs):
  """``attack_catalogue`` whose result is kept in ``cache_dir`` as ``<key>.npy`` + ``.json``
  (stats, fingerprint and ``array_sha256``: the :func:`content_digest` of the ``.npy``'s
  array, sha256 of its dtype, shape and bytes; key = the condition, plus the attacked
  system for a white-box attack) and loaded, not recomputed, while the fingerprint matches
  (same parameters, backbone, compute dtype, photos of every item, attack and attacked
  items: :func:`fingerprint`) and the ``.npy`` is intact. A cache whose bytes no longer
  match its checksum (replaced, truncated) is crafted again, with a warning naming it.
  Writes are atomic.

  Returns: as ``attack_catalogue``; the stats gain ``'cached': bool``.
  """
  if not cache_dir:
    adv, stats = attack_catalogue(spec, **kwargs)
    return adv, dict(stats, cached=False)
  images = kwargs["data"].images
  items = kwargs.get("items")
  shape = images.shape if items is None else (len(items),) + tuple(images.shape[1:])
  settings = None
  if spec.through is not None and kwargs.get("config") is not None:
    settings = SYSTEMS.get(spec.through).settings(kwargs["config"])
  settings = dict(settings or {}, constants={k: np.asarray(v).tolist() for k, v in
                                             (kwargs.get("constants") or {}).items()})
  key = fingerprint(spec, params=kwargs["params"], consts=kwargs["consts"],
                    image_shape=shape, items=items, settings=settings, images=images,
                    table=kwargs.get("table"),
                    dtype=getattr(kwargs.get("models"), "dtype", "float32"))
  stem = fs.join(cache_dir, spec.condition + (f"@{spec.through}" if spec.through else ""))
  cached = _load_cached(stem, key, shape)
  if cached is not None:
    logging.info("%s: attacked catalogue loaded from %s.npy", spec.condition, stem)
    return cached[0], dict(cached[1], cached=True)
  fs.makedirs(cache_dir, exist_ok=True)
  if isinstance(images, np.memmap) and items is None and fs.is_local(stem):
    # config.data.image_store='mmap': the attacked catalogue is written to its cache file
    # batch by batch and mapped back, never held in memory.
    with atomic.atomic_path(stem + ".npy") as tmp:
      target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
      adv, stats = attack_catalogue(spec, out=target, **kwargs)
      digest = content_digest(adv)
      target.flush()
      del adv, target
    atomic.write_json(stem + ".json", {"fingerprint": key, "array_sha256": digest,
                                       "stats": stats})
    return fs.np_load(stem + ".npy", mmap_mode="r", allow_pickle=False), dict(stats, cached=False)
  adv, stats = attack_catalogue(spec, **kwargs)
  digest = content_digest(adv)
  atomic.write_npy(stem + ".npy", adv)
  atomic.write_json(stem + ".json", {"fingerprint": key, "array_sha256": digest,
                                     "stats": stats})
  return adv, dict(stats, cached=False)
