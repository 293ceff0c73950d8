"""Ranking metrics and results.json.

Protocol (paper 4.2): each test user's held-out item is ranked among 100
sampled negatives. The rank of the positive is the number of negatives scoring
at least as high as it (ties count against the positive). Then

* HR@N = 1 if rank < N else 0,
* NDCG@N = 1 / log2(rank + 2) if rank < N else 0 (one relevant item, so IDCG = 1),

averaged over users.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars import configuration, steps
from jaxvars.data import splits
from jaxvars.features import batched_map
from jaxvars.models.vbpr import VBPR


def positive_ranks(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
  """0-based rank of each positive among its negatives, ties against the positive.

  Args:
    pos_scores: float [U]; neg_scores: float [U, n].

  Returns:
    int64 [U]: number of negatives with score >= the positive's.
  """
  pos_scores = np.asarray(pos_scores)
  return np.sum(np.asarray(neg_scores) >= pos_scores[:, None], axis=1).astype(np.int64)


def ranking_metrics(ranks: np.ndarray, ks=(5, 10, 20)) -> dict[str, float]:
  """HR@N and NDCG@N from 0-based ranks [U], for each N in ``ks``.

  Returns:
    {'HR@5': ..., 'NDCG@5': ..., 'HR@10': ..., ...}: Python floats in [0, 1].
  """
  ranks = np.asarray(ranks)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"HR@{k}"] = float(np.mean(hit))
    out[f"NDCG@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)))
  return out


def mostpop_scores(train_items: np.ndarray, num_items: int) -> np.ndarray:
  """Most-popular baseline: each item's number of training interactions, float64 [I]."""
  return np.bincount(np.asarray(train_items), minlength=num_items).astype(np.float64)


def candidate_matrix(test_items: np.ndarray, eval_negatives: np.ndarray) -> np.ndarray:
  """[U, 1 + n] int32: the positive in column 0, then the negatives."""
  return np.concatenate([np.asarray(test_items)[:, None], eval_negatives], axis=1).astype(np.int32)


def evaluate_scores(candidate_scores: np.ndarray, ks) -> dict[str, float]:
  """Metrics of a score matrix [U, 1 + n] whose column 0 is the positive."""
  return ranking_metrics(positive_ranks(candidate_scores[:, 0], candidate_scores[:, 1:]), ks)


@functools.partial(jax.jit, static_argnames=("model",))
def _vbpr_scores(model: VBPR, params, users, candidates, features):
  return model.apply({"params": params}, users[:, None], candidates, features[candidates])


def vbpr_candidate_scores(model: VBPR, params, features, candidates: np.ndarray,
                          batch_users: int) -> np.ndarray:
  """VBPR scores x_ui of every user's candidates.

  Args:
    model, params: the VBPR module and its parameters.
    features: float32 [I, F] normalised item features (clean or attacked).
    candidates: int32 [U, C] item indices per user (row u belongs to user u).
    batch_users: users per jitted call (the last batch is padded: one compile).

  Returns:
    float32 [U, C] (host array).
  """
  num_users = len(candidates)
  out = []
  for start in range(0, num_users, batch_users):
    users = np.arange(start, min(start + batch_users, num_users), dtype=np.int32)
    cand = candidates[start:start + batch_users]
    pad = batch_users - len(users)
    if pad:
      users = np.concatenate([users, np.zeros(pad, np.int32)])
      cand = np.concatenate([cand, np.zeros((pad, cand.shape[1]), np.int32)])
    scores = _vbpr_scores(model, params, jnp.asarray(users), jnp.asarray(cand), features)
    out.append(np.asarray(scores)[:batch_users - pad])
  return np.concatenate(out, axis=0)


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to ``path`` through a temporary file and a rename: never half-written."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def format_ranking_table(ranking: dict[str, dict[str, float]]) -> str:
  """A plain-text table: one row per key (``<system>/<condition>``), one column per metric."""
  if not ranking:
    return "(no results)"
  metrics = list(next(iter(ranking.values())).keys())
  width = max(len(k) for k in ranking) + 2
  cols = [max(9, len(m) + 2) for m in metrics]
  lines = ["".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))]
  for key, row in ranking.items():
    cells = []
    for m, c in zip(metrics, cols):
      v = row.get(m)
      cells.append(f"{v:{c}.4f}" if isinstance(v, float) and not math.isnan(v) else "n/a".rjust(c))
    lines.append(key.ljust(width) + "".join(cells))
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Detection metrics.
# ---------------------------------------------------------------------------

def roc_auc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float:
  """Area under the ROC curve of "score > t means adversarial" (Mann-Whitney U; ties count 1/2).

  Args:
    clean_scores: [n0] scores of clean inputs (label 0); adv_scores: [n1] (label 1).
  """
  clean_scores, adv_scores = np.asarray(clean_scores, float), np.asarray(adv_scores, float)
  values = np.concatenate([clean_scores, adv_scores])
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  order = np.argsort(values, kind="mergesort")
  ranks = np.empty(len(values))
  ranks[order] = np.arange(1, len(values) + 1)
  ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # Average rank of ties.
  n0, n1 = len(clean_scores), len(adv_scores)
  return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def detection_metrics(*, calibration_clean: np.ndarray, clean: np.ndarray, adversarial: np.ndarray,
                      fpr: float) -> dict[str, float]:
  """Detection quality on a balanced held-out set.

  The threshold is the (1 - fpr) quantile of ``calibration_clean`` (clean items apart
  from the evaluation set), so about ``fpr`` of clean inputs are flagged.

  Args:
    calibration_clean: [m] scores of clean calibration inputs.
    clean, adversarial: [n] scores of held-out clean inputs and their attacked versions.
    fpr: target false-positive rate.

  Returns:
    {'accuracy' (balanced set, calibrated threshold), 'roc_auc', 'tpr@fpr=<fpr>' (TPR at the
    held-out ROC point with that FPR), 'threshold', 'fpr_at_threshold', 'tpr_at_threshold'}.
  """
  threshold = float(np.quantile(calibration_clean, 1.0 - fpr))
  tpr_at = float(np.mean(adversarial > threshold))
  fpr_at = float(np.mean(clean > threshold))
  roc_threshold = np.quantile(clean, 1.0 - fpr)
  return {"accuracy": 0.5 * (tpr_at + 1.0 - fpr_at), "roc_auc": roc_auc(clean, adversarial),
          f"tpr@fpr={fpr:g}": float(np.mean(adversarial > roc_threshold)),
          "threshold": threshold, "fpr_at_threshold": fpr_at, "tpr_at_threshold": tpr_at}


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


# ---------------------------------------------------------------------------
# Attacked catalogues and the evaluation of every system under every condition.
# ---------------------------------------------------------------------------

SYSTEMS = ("vbpr", "defended", "defended_rand")


def attack_fingerprint(*, params, consts, config, kind: str, eps: float, image_shape) -> str:
  """A hash of everything an attacked catalogue depends on: VBPR's parameters, the item
  features (hence the backbone and the photos), the attack settings, kind and eps."""
  a = config.attack
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params["vbpr"]):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(np.ascontiguousarray(np.asarray(consts["features"][:64])).tobytes())
  h.update(json.dumps([kind, float(eps), list(image_shape), int(a.seed), int(a.pgd_steps),
                       configuration.pgd_alpha(a, eps), bool(a.random_start),
                       int(a.triplets_per_item)]).encode())
  return h.hexdigest()[:20]


def cached_attack_catalogue(*, cache_dir: str | None, **kwargs):
  """``attack_catalogue`` whose result is kept in ``cache_dir`` as ``<kind>@<eps>.npy`` +
  ``.json`` (stats and fingerprint) and loaded, not recomputed, while the fingerprint
  matches (same VBPR, backbone, photos and attack settings). Writes are atomic.

  Returns: as ``attack_catalogue``; the stats gain ``'cached': bool``.
  """
  if not cache_dir:
    adv, stats = attack_catalogue(**kwargs)
    return adv, dict(stats, cached=False)
  kind, eps = kwargs["kind"], float(kwargs["eps"])
  fingerprint = attack_fingerprint(params=kwargs["params"], consts=kwargs["consts"],
                                   config=kwargs["config"], kind=kind, eps=eps,
                                   image_shape=kwargs["data"].images.shape)
  stem = os.path.join(cache_dir, f"{kind}@{eps:g}")
  try:
    with open(stem + ".json") as f:
      meta = json.load(f)
    if meta.get("fingerprint") == fingerprint:
      adv = np.load(stem + ".npy", mmap_mode="r")
      if adv.shape == kwargs["data"].images.shape and adv.dtype == np.uint8:
        logging.info("%s@%g: attacked catalogue loaded from %s.npy", kind, eps, stem)
        return adv, dict(meta["stats"], cached=True)
  except (OSError, ValueError, KeyError):
    pass
  adv, stats = attack_catalogue(**kwargs)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = stem + ".tmp.npy"
  np.save(tmp, adv)
  os.replace(tmp, stem + ".npy")
  write_json_atomic(stem + ".json", {"fingerprint": fingerprint, "stats": stats})
  return adv, dict(stats, cached=False)


def attack_catalogue(*, system, params, consts, data, mesh, config, kind: str, eps: float):
  """Attacks every item image of the catalogue (paper eq. 3), in jitted sharded batches.

  Triplets and random starts come from ``config.attack.seed`` (and kind, eps), so the
  attacked catalogue is the same for every system evaluated on it. PGD's step size is
  ``configuration.pgd_alpha(config.attack, eps)``.

  Returns:
    (uint8 [I, S, S, 3] attacked images, {'linf', 'linf_255', 'l2', 'time_s'}).
  """
  a = config.attack
  rng = np.random.default_rng([a.seed, ("fgsm", "pgd").index(kind), int(round(eps * 1000))])
  items = np.arange(data.num_items, dtype=np.int32)
  keys = splits.pair_keys(data.train_users, data.train_items, data.num_items)
  triplets = splits.item_triplets(items, train_users=data.train_users, train_items=data.train_items,
                                  num_users=data.num_users, num_items=data.num_items,
                                  positive_keys=keys, per_role=a.triplets_per_item, rng=rng)
  base_key = jax.random.key(a.seed)

  @jax.jit
  def craft(batch):
    x = batch["images"].astype(jnp.float32) / 255.0
    adv = steps.craft_item_attack(
        system, params["vbpr"], consts, x, batch["items"],
        {k: batch[k] for k in triplets}, kind=kind, eps=eps, pgd_steps=a.pgd_steps,
        pgd_alpha=configuration.pgd_alpha(a, eps),
        key=jax.random.fold_in(base_key, batch["items"][0]),
        random_start=a.random_start)
    return jnp.round(adv * 255.0).astype(jnp.uint8)

  t = time.perf_counter()
  adv = batched_map(craft, {"images": data.images, "items": items, **triplets},
                    batch_size=a.batch_size, mesh=mesh, desc=f"{kind}@{eps:g} attack")
  elapsed = time.perf_counter() - t
  return adv, {**perturbation_stats(data.images, adv), "time_s": elapsed}


def system_features(system_name: str, *, system, params, consts, images: np.ndarray, mesh,
                    batch_size: int, seed: int) -> np.ndarray:
  """Normalised features [I, F] of a catalogue as seen by one system.

  'vbpr': ResNet(x); 'defended': ResNet(D(x)); 'defended_rand': ResNet(D(rand(x))) with a
  per-item key derived from ``seed`` (the same random transform for the same item).
  """
  base_key = jax.random.key(seed)

  @jax.jit
  def fn(batch):
    x = batch["images"].astype(jnp.float32) / 255.0
    if system_name == "defended":
      x = system.denoise(params, x)
    elif system_name == "defended_rand":
      keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(batch["items"])
      x = jax.vmap(lambda img, k: system.denoise(params, img[None], rand_key=k)[0])(x, keys)
    return system.features(consts, x)

  items = np.arange(len(images), dtype=np.int32)
  return batched_map(fn, {"images": images, "items": items}, batch_size=batch_size, mesh=mesh,
                     desc=f"{system_name} features")


def detection_scores(*, system, params, consts, images: np.ndarray, mesh, batch_size: int):
  """Detector scores ||z(x) - z(D(x))|| [N] of uint8 images [N, S, S, 3]."""
  fn = jax.jit(lambda b: system.detection_scores(params, consts,
                                                 b["images"].astype(jnp.float32) / 255.0))
  return batched_map(fn, {"images": images}, batch_size=batch_size, mesh=mesh,
                     desc="detector scores")


def evaluate_all(*, system, params, consts, data, mesh, config, holdout: np.ndarray,
                 calibration: np.ndarray, systems=SYSTEMS, detect: bool = True,
                 eval_eps=None, kinds=("fgsm", "pgd"), cache_dir: str | None = None,
                 mostpop: bool = True) -> dict:
  """Every table of results.json: ``ranking``, ``detection``, ``attack``, and their timing.

  Conditions: clean and, for every eps in ``eval_eps`` (default
  ``config.attack.eval_eps``) and kind in ``kinds``, ``<kind>@<eps>`` (the whole catalogue
  attacked once per condition, against VBPR, and reused by every system; kept in
  ``cache_dir`` when given, see ``cached_attack_catalogue``).
  Systems: ``mostpop`` (clean only, if ``mostpop``) and ``systems`` (of ``vbpr``,
  ``defended``, ``defended_rand``). Detection (if ``detect``) uses the ``holdout`` items
  (never used to train the defence), each clean and attacked (a balanced set), with the
  threshold from the clean ``calibration`` items.
  """
  ks = tuple(config.eval.ks)
  bs = config.attack.batch_size
  cands = candidate_matrix(data.test_items, data.eval_negatives)
  timing = {}
  ranking = {}
  if mostpop:
    ranking["mostpop/clean"] = evaluate_scores(
        mostpop_scores(data.train_items, data.num_items)[cands], ks)
  conditions = [("clean", None, None)] + [
      (f"{kind}@{float(eps):g}", kind, float(eps))
      for eps in (config.attack.eval_eps if eval_eps is None else eval_eps) for kind in kinds]
  attack, detection, artifacts = {}, {}, {}
  timing["ranking_s"] = 0.0
  do_detect = detect and len(conditions) > 1
  if do_detect:
    t = time.perf_counter()
    score = lambda imgs: detection_scores(system=system, params=params, consts=consts,
                                          images=imgs, mesh=mesh, batch_size=bs)
    cal = score(data.images[calibration])
    clean_hold = score(data.images[holdout])
    artifacts = {"detector/calibration_clean": cal, "detector/clean": clean_hold,
                 "holdout_items": np.asarray(holdout, np.int32)}
    timing["detection_s"] = time.perf_counter() - t
  # One attacked catalogue in memory at a time (a cached one is memory-mapped).
  for cond, kind, eps in conditions:
    if kind is None:
      images = data.images
    else:
      images, attack[cond] = cached_attack_catalogue(
          cache_dir=cache_dir, system=system, params=params, consts=consts, data=data,
          mesh=mesh, config=config, kind=kind, eps=eps)
    t = time.perf_counter()
    for sys_name in systems:
      if sys_name == "vbpr" and cond == "clean":
        feats = consts["features"]
      else:
        feats = system_features(sys_name, system=system, params=params, consts=consts,
                                images=images, mesh=mesh, batch_size=bs, seed=config.attack.seed)
      scores = vbpr_candidate_scores(system.vbpr, params["vbpr"], jnp.asarray(feats), cands,
                                     config.eval.batch_users)
      ranking[f"{sys_name}/{cond}"] = evaluate_scores(scores, ks)
    timing["ranking_s"] += time.perf_counter() - t
    if do_detect:
      t = time.perf_counter()
      if kind is not None:
        artifacts[f"detector/{cond}"] = score(images[holdout])
        detection[cond] = detection_metrics(calibration_clean=cal, clean=clean_hold,
                                            adversarial=artifacts[f"detector/{cond}"],
                                            fpr=config.detector.fpr)
        detection[cond]["items"] = int(len(holdout))
      artifacts.update(_report_samples(system=system, params=params, consts=consts, data=data,
                                       conditions={cond: images}, holdout=holdout))
      timing["detection_s"] += time.perf_counter() - t
    del images
  # Rows grouped by system, conditions in sweep order (the layout of the printed table).
  order = [f"{s}/{c}" for s in ("mostpop",) + tuple(systems) for c, _, _ in conditions]
  ranking = {k: ranking[k] for k in order if k in ranking}
  return {"ranking": ranking, "detection": detection, "attack": attack, "timing": timing,
          "artifacts": artifacts}


def _report_samples(*, system, params, consts, data, conditions, holdout, images_per_condition=8,
                    embedded_items=200) -> dict[str, np.ndarray]:
  """Pictures and embeddings for figures: for the first held-out items, each condition's
  uint8 images and their denoised versions; detector embeddings of clean, denoised and
  attacked images of up to ``embedded_items`` held-out items."""
  out = {}
  denoise = jax.jit(lambda x: jnp.round(
      system.denoise(params, x.astype(jnp.float32) / 255.0) * 255.0).astype(jnp.uint8))
  embed = jax.jit(lambda x: system.embed_pooled(
      params, system.backbone_out(consts, x.astype(jnp.float32) / 255.0)["pooled"]))
  shown, embedded = holdout[:images_per_condition], holdout[:embedded_items]
  for cond, images in conditions.items():
    out[f"images/{cond}"] = images[shown]
    out[f"images/{cond}/denoised"] = np.asarray(denoise(images[shown]))
    out[f"embeddings/{cond}"] = np.asarray(embed(images[embedded]))
    if cond == "clean":
      out["embeddings/clean/denoised"] = np.asarray(embed(np.asarray(denoise(images[embedded]))))
  return out


# ---------------------------------------------------------------------------
# Linear probe of a feature extractor (issue: what a backbone buys).
# ---------------------------------------------------------------------------

def linear_probe(features: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                 min_per_class: int = 5, test_fraction: float = 0.2, steps: int = 500,
                 lr: float = 0.05, l2: float = 1e-4) -> dict:
  """Accuracy of a softmax-regression probe on frozen features, on a held-out split.

  Items with an empty label, or whose class has fewer than ``min_per_class`` labelled
  items, are left out. The split is a seeded random permutation; features are
  standardised with the training split's statistics; the probe is trained full-batch
  with Adam for ``steps`` steps (L2 weight ``l2``).

  Args:
    features: float [N, F]. labels: str [N] ('' = unlabelled).

  Returns:
    {'accuracy', 'majority_accuracy' (always predicting the most frequent training class),
     'classes', 'train_items', 'test_items'}.
  """
  import optax

  labels = np.asarray(labels)
  names, counts = np.unique(labels[labels != ""], return_counts=True)
  keep_names = names[counts >= min_per_class]
  keep = np.isin(labels, keep_names)
  x, y = np.asarray(features, np.float32)[keep], np.searchsorted(keep_names, labels[keep])
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = max(1, int(round(len(y) * test_fraction)))
  test, train_ = order[:n_test], order[n_test:]
  mean, std = x[train_].mean(0), x[train_].std(0) + 1e-6
  xtr, xte = (x[train_] - mean) / std, (x[test] - mean) / std
  num_classes = len(keep_names)
  tx = optax.adam(lr)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

  def loss(p):
    logits = xtr @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[train_]).mean()
    return ce + l2 * jnp.sum(p["w"] ** 2)

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  pred = np.asarray(jnp.argmax(xte @ params["w"] + params["b"], axis=-1))
  majority = np.bincount(y[train_], minlength=num_classes).argmax()
  return {"accuracy": float(np.mean(pred == y[test])),
          "majority_accuracy": float(np.mean(y[test] == majority)),
          "classes": int(num_classes), "train_items": int(len(train_)),
          "test_items": int(len(test))}
