"""Targeted item promotion (a seller promoting its own cold item): AIP's INSA, EXPA and
c-SEMA (Liu & Larson 2021), TAaMR (Di Noia et al. 2020), measured as the paper's Table 6
(prediction shift with and without the defence), AIP's target HR@N and Anelli et al.'s
CHR@K, SR and FL.

Protocol (:func:`choose_targets`): ``config.targeted.num_targets`` items of the least
popular category (the "source" category, Anelli et al.; all items where the data has no
categories), cold ones (no training interaction, AIP's cold-start protocol) first, drawn
with a seeded generator; all targets attacked at once, every other photo clean. Each
attack's targets are ranked among all items a user has not bought, for every user, under
every evaluated system; the defended systems see the attacked photos through their defence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvars.attacks.catalogue import attack_catalogue, perturbation_stats
from jaxvars.attacks.semantic import composite_inset
from jaxvars.defenses import UNDEFENDED, row_name
from jaxvars.evaluation import bootstrap
from jaxvars.evaluation.fidelity import psnr, ssim
from jaxvars.pixels import to_float


def category_popularity(data) -> dict[str, float]:
  """{category: training interactions per item} of the categories in ``data``."""
  counts = np.bincount(data.train_items, minlength=data.num_items)
  cats = np.asarray(data.categories)
  return {c: float(counts[cats == c].mean()) for c in np.unique(cats) if c}


def choose_targets(data, n: int, seed: int) -> tuple[np.ndarray, str]:
  """(int32 [n] target items, their source category): the least popular category with at
  least ``n`` items (all items when none qualifies), cold items first (seeded order), then
  the least interacted."""
  counts = np.bincount(data.train_items, minlength=data.num_items)
  cats = np.asarray(data.categories)
  popularity = {c: p for c, p in category_popularity(data).items() if np.sum(cats == c) >= n}
  source = min(popularity, key=lambda c: (popularity[c], c)) if popularity else ""
  pool = np.flatnonzero(cats == source) if source else np.arange(data.num_items)
  rng = np.random.default_rng([seed, 14])
  pool = pool[rng.permutation(len(pool))]
  pool = pool[np.argsort(counts[pool], kind="stable")]  # Cold first, seeded among equals.
  return np.sort(pool[:n]).astype(np.int32), source


def popular_category(data, min_items: int = 1) -> str:
  """The category with the most training interactions per item among those with at least
  ``min_items`` items (all categories when none has that many; '' without categories).

  The size floor keeps a handful of best-sellers from standing for "popular": on H&M
  without it the winner is 'Nipple covers' (a few items), whose photos define no ImageNet
  class worth steering TAaMR's targets to."""
  popularity = category_popularity(data)
  cats = np.asarray(data.categories)
  large = {c: p for c, p in popularity.items() if np.sum(cats == c) >= min_items}
  popularity = large or popularity
  return max(popularity, key=lambda c: (popularity[c], c)) if popularity else ""


def target_class(models, consts, data, category: str, *, batch: int = 64) -> int | None:
  """TAaMR's target: the ImageNet class the backbone gives most often (top 1) to the popular
  category's photos (all photos without categories); None without a classifier head."""
  items = np.flatnonzero(np.asarray(data.categories) == category) if category else np.arange(
      data.num_items)
  classify = jax.jit(lambda x: jnp.argmax(models.backbone_out(consts, to_float(x)).get(
      "logits", jnp.zeros((x.shape[0], 1))), axis=-1))
  if "logits" not in jax.eval_shape(lambda x: models.backbone_out(consts, to_float(x)),
                                    data.images[:1]):
    return None
  classes = np.concatenate([np.asarray(classify(data.images[items[s:s + batch]]))
                            for s in range(0, len(items), batch)])
  return int(np.bincount(classes).argmax())


def all_item_scores(recommender, rec_params, feats: np.ndarray, num_users: int,
                    users_per_call: int = 128) -> np.ndarray:
  """Scores [U, I] of every user for every item with item features [I, F].

  Users [B, 1] are broadcast against items [1, I] and features [1, I, F] inside the
  recommender, so an item's visual term is computed once per block, not once per user (an
  explicit [B, I, F] broadcast is 11 GB and about 350 GFLOP per block of 128 users on H&M).
  """
  f = jnp.asarray(feats)
  out = [np.asarray(_score_block(rec_params, jnp.arange(s, min(s + users_per_call, num_users)),
                                 f, recommender=recommender))
         for s in range(0, num_users, users_per_call)]
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("recommender",))
def _score_block(rec_params, users, f, *, recommender):
  return recommender.score(rec_params, users[:, None], jnp.arange(f.shape[0])[None, :], f[None])


def train_mask(data) -> np.ndarray:
  """bool [U, I]: True where the user bought the item in training (excluded from lists)."""
  mask = np.zeros((data.num_users, data.num_items), bool)
  mask[data.train_users, data.train_items] = True
  return mask


def list_metrics(scores: np.ndarray, mask: np.ndarray, targets: np.ndarray,
                 source: np.ndarray, ns, ks) -> dict:
  """Top-N metrics of scores [U, I] over the items each user has not bought (``mask``
  True = bought in training, left out of the user's list).

  Returns:
    {'HR@N': float [T] per target: the share of the users who have not bought it whose top
    N it enters (ties count against it), 'CHR@K': float [U] per user: the number of
    source-category items in the top K (Anelli et al.), 'scores': float [U, T] the targets'
    scores}.
  """
  s = np.where(mask, -np.inf, scores)
  tscore = scores[:, targets]  # [U, T]
  ordered = np.sort(s, axis=1)
  n_items = s.shape[1]
  at_least = np.stack([n_items - np.searchsorted(ordered[u], tscore[u], side="left")
                       for u in range(len(s))])  # Items scoring >= the target, itself included.
  open_ = ~mask[:, targets]
  ranks = at_least - open_  # Other items at least as high.
  out = {f"HR@{n}": np.sum((ranks < n) & open_, axis=0) / np.maximum(open_.sum(axis=0), 1)
         for n in ns}
  kmax = max(ks)
  top = np.argpartition(-s, kmax - 1, axis=1)[:, :kmax]
  top_scores = np.take_along_axis(s, top, axis=1)
  top = np.take_along_axis(top, np.argsort(-top_scores, axis=1, kind="stable"), axis=1)
  out.update({f"CHR@{k}": source[top[:, :k]].sum(axis=1).astype(np.float64) for k in ks})
  out["scores"] = tscore
  return out


def _system_metrics(per_draw: list[dict], clean: list[dict], base_scores: np.ndarray, ns, ks,
                    kw) -> dict:
  """Metrics of a system under one attack (averaged over draws) with 95% intervals: target
  HR@N (over targets), CHR@K (over users), prediction shift (over targets) and the paired
  differences from the same system on clean photos."""
  mean = lambda key: np.mean([d[key] for d in per_draw], axis=0)
  mean_clean = lambda key: np.mean([d[key] for d in clean], axis=0)
  out = {}
  for key in [f"HR@{n}" for n in ns] + [f"CHR@{k}" for k in ks]:
    a, b = mean(key), mean_clean(key)
    out[key] = {"value": float(np.mean(a)), "ci95": bootstrap.mean_ci(a, **kw),
                "clean": float(np.mean(b)), "diff": bootstrap.paired_diff_ci(a, b, **kw)}
  shift = np.mean(mean("scores") - base_scores, axis=0)  # [T]: mean over users.
  out["prediction_shift"] = {"value": float(np.mean(shift)), "ci95": bootstrap.mean_ci(shift, **kw)}
  return out


class Targeted:
  """The targeted attacks' shared state and scoring, one condition at a time (the loop of
  :mod:`jaxvars.evaluation.loop` crafts, extracts features and calls :meth:`score`).

  ``__init__`` chooses the targets, their source category, TAaMR's class and AIP's hook,
  and scores every system on clean photos. ``results``: results.json's ``targeted``
  section; ``artifacts``: sample images.
  """

  def __init__(self, *, models, params, consts, data, mesh, config, systems,
               clean_feats: dict, detector=None):
    t, e = config.targeted, config.eval
    self.models, self.params, self.consts, self.data = models, params, consts, data
    self.mesh, self.config, self.detector = mesh, config, detector
    self.kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
    self.ns, self.ks = tuple(t.hr_n), tuple(t.chr_k)
    self.targets, source = choose_targets(data, int(t.num_targets), int(config.seed))
    self.in_source = ((np.asarray(data.categories) == source) if source
                      else np.zeros(data.num_items, bool))
    self.in_source[self.targets] = True
    popular = popular_category(data, min_items=int(t.num_targets))  # As large as the source.
    self.klass = target_class(models, consts, data, popular)
    self.hooks = splits_popular(data, int(t.hook_items))
    self.mask = train_mask(data)
    self.names = {s: row_name(s, models.recommender.name) for s in systems}
    self.clean_feats = clean_feats
    self.clean = self._metrics({s: clean_feats[s] for s in systems})
    self.base = self.clean[UNDEFENDED][0]["scores"] if UNDEFENDED in self.clean else None
    self.results = {"targets": int(len(self.targets)), "source_category": source,
                    "popular_category": popular, "target_class": self.klass,
                    "hook_items": [int(h) for h in self.hooks], "attacks": {},
                    "protocol": "all targets attacked at once; the rest of the catalogue clean"}
    self.artifacts = {"targeted/items": self.targets,
                      "targeted/clean": data.images[self.targets[:8]]}
    self.constants = {"target_class": np.int32(self.klass if self.klass is not None else 0),
                      "hook_items": self.hooks}

  @property
  def has_logits(self) -> bool:
    return self.klass is not None

  def _metrics(self, feats_by_system: dict) -> dict:
    out = {}
    for s, f in feats_by_system.items():
      f = f if f.ndim == 3 else f[None]
      out[s] = [list_metrics(all_item_scores(self.models.recommender, self.params["recommender"],
                                             fd, self.data.num_users),
                             self.mask, self.targets, self.in_source, self.ns, self.ks)
                for fd in f]
    return out

  def craft(self, spec, table: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(uint8 [T, S, S, 3] the targets' attacked photos, stats); ``spec`` None: c-SEMA (the
    hook item's photo pasted into each target's); ``table``: the objective's item table (a
    white-box attack's deployed table, :func:`jaxvars.evaluation.loop.deployed_table`;
    None: the clean one)."""
    if spec is None:
      return composite_inset(self.data.images[self.targets],
                             self.data.images[self.hooks[0]]), {}
    return attack_catalogue(spec, models=self.models, params=self.params, consts=self.consts,
                            data=self.data, mesh=self.mesh,
                            batch_size=self.config.attack.batch_size, config=self.config,
                            items=self.targets, constants=self.constants,
                            **({"table": table} if table is not None else {}))

  def score(self, key: str, threat: str, adv: np.ndarray, feats: dict, stats: dict) -> None:
    """Adds attack ``key``'s row: ``feats`` {system: features of the attacked targets
    [T, F] or [K, T, F]} spliced into the clean catalogue's, then every list metric, the
    images' statistics, TAaMR's success rate, the feature loss and the detection rate."""
    spliced = {}
    for s, f in feats.items():
      full = np.array(self.clean_feats[s])
      full[..., self.targets, :] = f
      spliced[s] = full
    attacked = self._metrics(spliced)
    row = {"threat": stats.get("threat", threat),
           "images": _image_stats(self.data, self.targets, adv), "systems": {}}
    if self.klass is not None:
      row["success_rate"] = _success_rate(self.models, self.params, self.consts, adv,
                                          self.klass, self.kw)
    row["feature_loss"] = _feature_loss(self.models, self.consts, self.data.images[self.targets],
                                        adv, self.kw)
    if self.detector is not None:
      flagged = self.detector.scores(adv) > self.detector.threshold
      row["detected"] = {"value": float(np.mean(flagged)),
                         "ci95": bootstrap.mean_ci(flagged, **self.kw)}
    for s in feats:
      if self.base is not None:
        row["systems"][self.names[s]] = _system_metrics(attacked[s], self.clean[s], self.base,
                                                        self.ns, self.ks, self.kw)
    self.results["attacks"][key] = row
    self.artifacts[f"targeted/{key}"] = adv[:8]


def splits_popular(data, n: int) -> np.ndarray:
  """The ``n`` most interacted training items (AIP's hook: the most popular one)."""
  from jaxvars.attacks.objectives.expa import popular_items
  return popular_items(data, n)


def _map_images(fn, *arrays: np.ndarray, batch: int = 64) -> np.ndarray:
  """A jitted ``fn(*chunks) -> [b, ...]`` over arrays [N, ...] in batches of ``batch`` (the
  last one padded by repeating its first row, so ``fn`` compiles once); returns [N, ...]."""
  out = []
  for start in range(0, len(arrays[0]), batch):
    chunks = [np.asarray(a[start:start + batch]) for a in arrays]
    m = len(chunks[0])
    if m < batch:
      chunks = [np.concatenate([c, np.repeat(c[:1], batch - m, axis=0)]) for c in chunks]
    out.append(np.asarray(fn(*chunks))[:m])
  return np.concatenate(out)


# Module-level jitted helpers (weights as arguments, modules static): compiled once per
# run, not once per targeted attack.
_psnr_u8 = jax.jit(lambda a, c: psnr(to_float(a), to_float(c)))
_ssim_u8 = jax.jit(lambda a, c: ssim(to_float(a), to_float(c)))


@functools.partial(jax.jit, static_argnames=("models", "denoise"))
def _top_class(p, c, images, *, models, denoise: bool):
  x = to_float(images)
  if denoise:
    x = models.denoise(p, x)
  return jnp.argmax(models.backbone_out(c, x)["logits"], axis=-1)


@functools.partial(jax.jit, static_argnames=("models",))
def _pooled(c, images, *, models):
  return models.backbone_out(c, to_float(images))["pooled"]


def _image_stats(data, targets, adv) -> dict:
  clean = data.images[targets]
  out = perturbation_stats(clean, adv)
  out["psnr"] = float(np.mean(_map_images(_psnr_u8, adv, clean)))
  if min(clean.shape[1:3]) >= 11:
    out["ssim"] = float(np.mean(_map_images(_ssim_u8, adv, clean)))
  out["lpips"] = None  # LPIPS needs network weights no package here installs.
  return out


def _success_rate(models, params, consts, adv, klass: int, kw) -> dict:
  """SR (Anelli et al.): the share of attacked photos the backbone's classifier now puts in
  the target class, as uploaded and after the denoiser."""
  hit = _map_images(lambda u8: _top_class(params, consts, u8, models=models, denoise=False),
                    adv) == klass
  out = {"value": float(np.mean(hit)), "ci95": bootstrap.mean_ci(hit, **kw)}
  if "denoiser" in params:
    hit_d = _map_images(lambda u8: _top_class(params, consts, u8, models=models, denoise=True),
                        adv) == klass
    out["after_denoiser"] = {"value": float(np.mean(hit_d)), "ci95": bootstrap.mean_ci(hit_d, **kw)}
  return out


def _feature_loss(models, consts, clean, adv, kw) -> dict:
  """FL (Anelli et al.): the MSE between the backbone's pooled features of the clean and the
  attacked photo, per target."""
  feats = lambda z: _map_images(lambda u8: _pooled(consts, u8, models=models), z)
  fl = np.mean(np.square(feats(adv) - feats(clean)), axis=-1)
  return {"value": float(np.mean(fl)), "ci95": bootstrap.mean_ci(fl, **kw)}
