"""What OURS-rand's random resize + pad (Xie et al. 2018) does to clean item features and to
the clean ranking, and where its clean loss comes from (issue 35, item 7).

  nice -n 19 python benchmarks/rand_clean_loss.py --workdir=/work/runs/rand_study \\
      [--items=2000] [--parts=subset,ranking,retrain] \\
      [--out=results/benchmarks/rand_clean_loss.json] [--key=quickstart]

``--workdir`` holds a finished ``configs/joint.py:cpu,hm`` run (``checkpoints/`` of the
recommender and every defence stage, ``split.npz``, ``config.json``); the parameters are
restored as ``jaxvars.run.evaluate`` restores them. What this script computes is cached
under ``<workdir>/rand_clean_loss_cache/`` (the denoised catalogue, every feature table), so
a second call only redoes what is missing.

Parts:

* ``subset``: on ``--items`` items (seeded) and ``--subset_draws`` draws of the evaluation's
  keys (draw d of item i = the key OURS-rand gets in evaluation), the cosine of the
  normalised features f(rand(D(x))) to f(x) and to f(D(x)), by drawn scale and padding, and
  of the transform's pieces, written with the ops of ``jaxvars.defenses.transforms``
  (``scale_and_translate``, linear, antialiased; the border fill by coverage):
  ``resample`` (shrink by s and blow back up: the resolution lost, no frame, no shift),
  ``offset_*`` (the full-size photo shifted by the drawn offset's distance from centre,
  no shrink), ``scale_centred_*`` (shrunk by s, centred), ``scale_offset_*`` (shrunk, at the
  drawn offset: ``scale_offset_zero`` is the deployed transform, checked equal to
  :func:`random_resize_pad`). ``*_zero`` pads black, ``*_border`` with the photo's border
  colour. Also a fixed-scale sweep (centred) and rand(x) without D. Beside the cosine:
  ``score_noise``, the item-specific change of VBPR's score over the subset items (per user,
  centred, RMS) relative to the spread of the clean scores, which is what moves ranks.
* ``ranking``: sampled HR@10 / NDCG@10 (the 100-negatives protocol,
  :mod:`jaxvars.evaluation.ranking`) with 95% bootstrap intervals over the 887 users
  (:func:`jaxvars.evaluation.summary.row_summary`) and paired differences, for VBPR on f(x),
  f(D(x)), and rand variants over the whole catalogue (``--rank_variants``): one draw (the
  per-draw metrics averaged over draws, as the evaluation reports OURS-rand) and features
  averaged over 2, 4, 8 draws (VBPR's score is linear in f, so this is the mean score).
* ``retrain``: the mismatch test: VBPR retrained (same recipe, seed and triplets as the run)
  on f(D(x)) and on rand(D(x)) (draws 4..7 of the deployed transform, one per epoch in
  turn), ranked on draws 0..3.

Prints tables and writes JSON with provenance.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxvars import provenance, sharding  # noqa: E402
from jaxvars.data import splits  # noqa: E402
from jaxvars.defenses.transforms import random_resize_pad  # noqa: E402
from jaxvars.evaluation import summary  # noqa: E402
from jaxvars.evaluation.ranking import (  # noqa: E402
    candidate_matrix, candidate_scores, positive_ranks)
from jaxvars.evaluation.system_features import draw_keys  # noqa: E402
from jaxvars.experiment import build, make_consts  # noqa: E402
from jaxvars.features import batched_map  # noqa: E402
from jaxvars.pixels import to_float  # noqa: E402
from jaxvars.training import defense, recommender as rec_training  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished cpu,hm run (copied).")
_PRESET = flags.DEFINE_string("preset", "cpu,hm", "configs/joint.py presets of the run.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "/work/shared/data/hm", "config.data.manual_dir.")
_PARTS = flags.DEFINE_list("parts", ["subset", "ranking", "retrain"], "What to run.")
_ITEMS = flags.DEFINE_integer("items", 2000, "Items of the subset analysis.")
_SUBSET_DRAWS = flags.DEFINE_integer("subset_draws", 2, "Draws per item in the subset analysis.")
_SWEEP_ITEMS = flags.DEFINE_integer("sweep_items", 1000, "Items of the fixed-scale sweep.")
_SWEEP_SCALES = flags.DEFINE_list("sweep_scales", ["0.875", "0.9", "0.925", "0.95", "0.975"],
                                  "Fixed scales of the sweep (centred).")
_RANK_VARIANTS = flags.DEFINE_list(
    "rank_variants", ["dx:0.875:zero:8", "dx:0.875:border:2", "dx:0.95:zero:2", "dx:0.95:border:2",
     "x:0.875:zero:2"],
    "Ranked rand variants, source:min_scale:pad:draws (source dx = rand(D(x)), x = rand(x)).")
_AVERAGE = flags.DEFINE_list("average", ["2", "4", "8"], "Draws averaged per item (features).")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per batch.")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples.")
_OUT = flags.DEFINE_string("out", "results/benchmarks/rand_clean_loss.json", "JSON output.")
_KEY = flags.DEFINE_string("key", "", "Write this call's results under this key of --out "
                           "(e.g. 'quickstart' for a second run), the rest of the file kept.")

SCALE_BINS = (0.875, 0.9, 0.925, 0.95, 0.975, 1.0)
T0 = time.perf_counter()


# ---- The transform's pieces, with the ops of jaxvars.defenses.transforms -------------------

def _place(img, s, ty, tx):
  return jax.image.scale_and_translate(img, img.shape, (0, 1), jnp.stack([s, s]),
                                       jnp.stack([ty, tx]), method="linear", antialias=True)


def resize_pad(images, s, ty, tx, pad: str):
  """``random_resize_pad`` with given scale and offsets [B] instead of drawn ones."""
  out = jax.vmap(_place)(images, s, ty, tx)
  if pad == "border":
    coverage = jax.vmap(_place)(jnp.ones_like(images[..., :1]), s, ty, tx)
    border = jnp.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]],
                             axis=1).mean(axis=1)
    out = out + (1.0 - coverage) * border[:, None, None, :]
  return out


def resample(images, s):
  """Shrink by s (into the corner, border fill) and blow back up by 1/s: the resolution the
  resize loses, with no frame and no shift."""
  zero = jnp.zeros_like(s)
  down = resize_pad(images, s, zero, zero, "border")
  return jax.vmap(lambda img, si: _place(img, 1.0 / si, jnp.float32(0), jnp.float32(0)))(down, s)


def draw_params(keys, min_scale: float, h: int, w: int):
  """(s, ty, tx) [B] that ``Models.rand`` draws from ``keys`` [B] (random_resize_pad on one
  image per key)."""
  def one(k):
    k_scale, k_y, k_x = jax.random.split(k, 3)
    s = jax.random.uniform(k_scale, (1,), minval=min_scale, maxval=1.0)
    ty = jax.random.uniform(k_y, (1,)) * (1.0 - s) * h
    tx = jax.random.uniform(k_x, (1,)) * (1.0 - s) * w
    return s[0], ty[0], tx[0]
  return jax.vmap(one)(keys)


def piece_images(x, s, ty, tx, piece: str):
  """The images of one piece (module docstring) from drawn (s, ty, tx)."""
  h, w = x.shape[1:3]
  cy, cx = (1.0 - s) * h / 2, (1.0 - s) * w / 2
  one = jnp.ones_like(s)
  if piece == "resample":
    return resample(x, s)
  kind, pad = piece.rsplit("_", 1)
  if kind == "offset":
    return resize_pad(x, one, ty - cy, tx - cx, pad)
  if kind == "scale_centred":
    return resize_pad(x, s, cy, cx, pad)
  if kind == "scale_offset":
    return resize_pad(x, s, ty, tx, pad)
  raise ValueError(piece)


PIECES = ("resample", "offset_border", "offset_zero", "scale_centred_border",
          "scale_centred_zero", "scale_offset_border", "scale_offset_zero")


# ---- Setup -----------------------------------------------------------------------------------

def load_config(workdir):
  spec = importlib.util.spec_from_file_location(
      "joint_config", os.path.join(os.path.dirname(__file__), "..", "configs", "joint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(_PRESET.value)
  config.data.manual_dir = _MANUAL_DIR.value
  diffs = []
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    mine = json.loads(config.to_json())

    def walk(a, b, prefix):
      for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
          walk(va, vb, f"{prefix}{k}.")
        elif va != vb:
          diffs.append(f"{prefix}{k}: run {vb!r} here {va!r}")
    walk(mine, stored, "")
  return config, diffs


class Ctx:
  """The restored run and the jitted passes."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.cache = os.path.join(workdir, "rand_clean_loss_cache")
    os.makedirs(self.cache, exist_ok=True)
    self.config, self.config_diffs = load_config(workdir)
    for d in self.config_diffs:
      logging.warning("config differs from the run's config.json: %s", d)
    t = time.perf_counter()
    exp = build(self.config, workdir)
    rec_state, backbone_vars, step = rec_training.restore(exp, workdir)
    self.params = defense.restore_stages(exp, dict(exp.params, recommender=rec_state.params),
                                         workdir)
    exp.backbone_vars = backbone_vars
    self.exp, self.models, self.data, self.mesh = exp, exp.models, exp.data, exp.mesh
    self.rec_step = int(step)
    fx_path = os.path.join(self.cache, "fx.npz")
    if os.path.exists(fx_path):
      z = np.load(fx_path)
      stats = {"mean": z["mean"], "std": z["std"]}
      self.consts = jax.device_put({"backbone": backbone_vars, "stats": stats,
                                    "features": jnp.asarray(z["features"])})
    else:
      self.consts = make_consts(exp)
      np.savez(fx_path, features=np.asarray(self.consts["features"]),
               mean=np.asarray(self.consts["stats"]["mean"]),
               std=np.asarray(self.consts["stats"]["std"]))
    self.fx = np.asarray(self.consts["features"])
    self.setup_s = time.perf_counter() - t
    self.seed = int(self.config.seed)
    self.size = int(self.config.data.image_size)
    models = self.models

    @jax.jit
    def feat(consts, x):
      return models.features(consts, x)

    @jax.jit
    def denoise(params, x_uint8):
      return models.denoise(params, to_float(x_uint8))

    @functools.partial(jax.jit, static_argnames=("min_scale", "pad", "draw", "draws"))
    def rand_feat(consts, x, items, *, min_scale, pad, draw, draws):
      keys = draw_keys(items, seed=self.seed, draws=draws)[draw]
      seen = jax.vmap(lambda img, k: random_resize_pad(img[None], k, min_scale=min_scale,
                                                       pad=pad)[0])(x, keys)
      return models.features(consts, seen)

    @functools.partial(jax.jit, static_argnames=("piece",))
    def piece_feat(consts, x, s, ty, tx, *, piece):
      return models.features(consts, piece_images(x, s, ty, tx, piece))

    @functools.partial(jax.jit, static_argnames=("min_scale", "draw", "draws"))
    def params_of(items, *, min_scale, draw, draws):
      keys = draw_keys(items, seed=self.seed, draws=draws)[draw]
      return draw_params(keys, min_scale, self.size, self.size)

    self._feat, self._denoise, self._rand_feat = feat, denoise, rand_feat
    self._piece_feat, self.params_of = piece_feat, params_of
    self.cands = candidate_matrix(self.data.test_items, self.data.eval_negatives)
    self.ks = tuple(int(k) for k in self.config.eval.ks)

  def map(self, fn, inputs, desc):
    return batched_map(fn, inputs, batch_size=_BATCH.value, mesh=self.mesh, desc=desc)

  def denoised(self, items=None) -> np.ndarray:
    """D(x) float32 [n, S, S, 3] of ``items`` (None: all), from the cache where it is."""
    path = os.path.join(self.cache, "denoised.npy")
    if os.path.exists(path):
      full = np.load(path, mmap_mode="r")
      return np.asarray(full if items is None else full[np.asarray(items)])
    imgs = self.data.images if items is None else self.data.images[np.asarray(items)]
    out = self.map(lambda b: self._denoise(self.params, b["x"]), {"x": imgs}, "D(x)")
    if items is None:
      np.save(path, out)
    return out

  def features(self, x, desc="features"):
    return self.map(lambda b: self._feat(self.consts, b["x"]), {"x": x}, desc)

  def table(self, name, compute):
    """A cached feature table [I, F] of the whole catalogue."""
    path = os.path.join(self.cache, f"{name}.npy")
    if os.path.exists(path):
      return np.load(path)
    t = time.perf_counter()
    out = compute()
    np.save(path, out)
    logging.info("%s: %.0f s", name, time.perf_counter() - t)
    return out

  def rand_table(self, source: str, min_scale: float, pad: str, draw: int, draws: int,
                 x_full):
    items = np.arange(self.data.num_items, dtype=np.int32)
    name = f"rand_{source}_{min_scale}_{pad}_d{draw}"

    def compute():
      fn = lambda b: self._rand_feat(self.consts, b["x"], b["items"], min_scale=min_scale,
                                     pad=pad, draw=draw, draws=draws)
      return self.map(fn, {"x": x_full(), "items": items}, name)
    return self.table(name, compute)

  def ranks(self, feats, rec_params=None):
    rec_params = self.params["recommender"] if rec_params is None else rec_params
    scores = candidate_scores(self.models.recommender, rec_params, jnp.asarray(feats),
                              self.cands, int(self.config.eval.batch_users))
    return positive_ranks(scores[:, 0], scores[:, 1:])


# ---- Part 1: features on a subset --------------------------------------------------------------

def cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def subset_part(ctx: Ctx) -> dict:
  t0 = time.perf_counter()
  n_items = ctx.data.num_items
  rng = np.random.default_rng([0, 35])
  items = np.sort(rng.choice(n_items, min(_ITEMS.value, n_items), replace=False)).astype(np.int32)
  x = to_float(ctx.data.images[items])
  x = np.asarray(x)
  dx = ctx.denoised(items)
  fx = ctx.fx[items]
  fdx = ctx.features(dx, "f(D(x)) subset")
  rec = ctx.models.recommender
  rp = ctx.params["recommender"]
  visual = jax.jit(rec.visual_fn(rp))
  form = ctx.config.recommender.form
  users_f = np.asarray(rp["user_factors"], np.float64)  # [U, K]
  item_f = np.asarray(rp["item_factors"], np.float64)[items]  # [n, K]
  v_fx = np.asarray(visual(fx), np.float64)
  clean_scores = users_f @ (item_f + v_fx).T  # [U, n]
  clean_spread = np.sqrt(np.mean(np.var(clean_scores, axis=1)))

  def measures(f, ref_f=None):
    """Mean cosines and score noise of features [n, F] (or [D, n, F] draws)."""
    f = np.asarray(f)
    stack = f if f.ndim == 3 else f[None]
    out = {"cos_fx": float(np.mean([cos(s, fx) for s in stack])),
           "cos_fdx": float(np.mean([cos(s, fdx) for s in stack])),
           "cos_Ef_fx": float(np.mean([cos(visual(s), v_fx) for s in stack]))}
    if form == "tang":
      noise = []
      for s in stack:
        delta = users_f @ (np.asarray(visual(s), np.float64) - v_fx).T  # [U, n]
        noise.append(np.sqrt(np.mean(np.var(delta, axis=1))))
      out["score_noise_vs_fx"] = float(np.mean(noise) / clean_spread)
      # The part of the feature change common to every item (it shifts every score of a user
      # alike, so it cannot move a rank) as a share of the squared change.
      d = stack - fx[None]
      out["common_share_vs_fx"] = float(np.sum(d.mean(1) ** 2) * d.shape[1] / np.sum(d ** 2))
    return out

  result = {"items": int(len(items)), "draws": _SUBSET_DRAWS.value,
            "reference": {"fdx": measures(fdx), "fx": {"cos_fx": 1.0}}}

  # The deployed transform's draws and the check that the pieces reproduce it.
  ms = float(ctx.config.denoiser.rand_min_scale)
  draws = _SUBSET_DRAWS.value
  params = [tuple(np.asarray(a) for a in ctx.params_of(jnp.asarray(items), min_scale=ms,
                                                        draw=d, draws=draws))
            for d in range(draws)]
  check = ctx.models.rand(jnp.asarray(dx[:64]), draw_keys(jnp.asarray(items[:64]), seed=ctx.seed,
                                                          draws=draws)[0], pad="zero")
  mine = piece_images(jnp.asarray(dx[:64]), *(jnp.asarray(a[:64]) for a in params[0]),
                      "scale_offset_zero")
  result["check_max_abs_diff_vs_models_rand"] = float(jnp.max(jnp.abs(check - mine)))
  logging.info("pieces vs Models.rand: max |diff| %.2e",
               result["check_max_abs_diff_vs_models_rand"])

  pieces = {}
  feats_by_piece = {}
  for piece in PIECES:
    per_draw = []
    for d, (s, ty, tx) in enumerate(params):
      fn = lambda b, piece=piece: ctx._piece_feat(ctx.consts, b["x"], b["s"], b["ty"], b["tx"],
                                                  piece=piece)
      per_draw.append(ctx.map(fn, {"x": dx, "s": s, "ty": ty, "tx": tx}, f"{piece} d{d}"))
    feats_by_piece[piece] = np.stack(per_draw)
    pieces[piece] = measures(feats_by_piece[piece])
    logging.info("%s %s", piece, pieces[piece])
  result["pieces"] = pieces

  # rand(x) without D (the deployed transform's draws on the photo itself).
  per_draw = []
  for d, (s, ty, tx) in enumerate(params):
    fn = lambda b: ctx._piece_feat(ctx.consts, b["x"], b["s"], b["ty"], b["tx"],
                                   piece="scale_offset_zero")
    per_draw.append(ctx.map(fn, {"x": x, "s": s, "ty": ty, "tx": tx}, f"rand(x) d{d}"))
  result["rand_x_zero"] = measures(np.stack(per_draw))

  # By the drawn scale: cosine to f(D(x)) and to f(x) of the deployed transform and its
  # border-padded twin, per scale bin.
  scales = np.stack([p[0] for p in params])  # [D, n]
  bins = {}
  for piece in ("scale_offset_zero", "scale_offset_border", "scale_centred_zero",
                "scale_centred_border", "resample"):
    f = feats_by_piece[piece]
    c_dx = np.stack([cos(f[d], fdx) for d in range(draws)])
    c_x = np.stack([cos(f[d], fx) for d in range(draws)])
    rows = []
    for lo, hi in zip(SCALE_BINS[:-1], SCALE_BINS[1:]):
      m = (scales >= lo) & (scales < hi if hi < 1 else scales <= hi)
      rows.append({"scale": [lo, hi], "n": int(m.sum()),
                   "cos_fdx": float(c_dx[m].mean()) if m.any() else None,
                   "cos_fx": float(c_x[m].mean()) if m.any() else None})
    bins[piece] = rows
  result["by_scale"] = bins

  # Fixed scales, centred (the frame alone), zero and border.
  k = min(_SWEEP_ITEMS.value, len(items))
  sweep = []
  for scale in [float(s) for s in _SWEEP_SCALES.value]:
    s = np.full(k, scale, np.float32)
    row = {"scale": scale}
    for pad in ("zero", "border"):
      fn = lambda b, pad=pad: ctx._piece_feat(ctx.consts, b["x"], b["s"], b["ty"], b["tx"],
                                              piece=f"scale_centred_{pad}")
      f = ctx.map(fn, {"x": dx[:k], "s": s, "ty": np.zeros_like(s), "tx": np.zeros_like(s)},
                  f"sweep {scale} {pad}")
      row[pad] = {"cos_fdx": float(cos(f, fdx[:k]).mean()), "cos_fx": float(cos(f, fx[:k]).mean())}
    sweep.append(row)
  result["sweep_centred"] = {"items": int(k), "rows": sweep}

  # Shares of the loss 1 - cos(., f(D(x))) along two chains of one change at a time.
  loss = {p: 1.0 - v["cos_fdx"] for p, v in pieces.items()}
  full = loss["scale_offset_zero"]
  shrink = loss["scale_centred_border"] - loss["resample"]
  chain_a = [("resolution (resample)", loss["resample"]),
             ("shrink into a border-coloured frame", shrink),
             ("random offset (border frame)",
              loss["scale_offset_border"] - loss["scale_centred_border"]),
             ("black instead of border colour", full - loss["scale_offset_border"])]
  chain_b = [("resolution (resample)", loss["resample"]),
             ("shrink into a border-coloured frame", shrink),
             ("black instead of border colour (centred)",
              loss["scale_centred_zero"] - loss["scale_centred_border"]),
             ("random offset (black frame)", full - loss["scale_centred_zero"])]
  result["loss_shares"] = {
      "loss_full": full,
      "offset_then_pad": [{"step": s, "loss": v, "share": v / full} for s, v in chain_a],
      "pad_then_offset": [{"step": s, "loss": v, "share": v / full} for s, v in chain_b]}
  result["seconds"] = time.perf_counter() - t0
  return result


# ---- Part 2: ranking ---------------------------------------------------------------------------

def parse_variant(text):
  source, ms, pad, draws = text.split(":")
  return source, float(ms), pad, int(draws)


def ranking_part(ctx: Ctx) -> tuple[dict, dict]:
  t0 = time.perf_counter()
  timing = {}
  dx_cache = {}

  def dx_full():
    if "dx" not in dx_cache:
      t = time.perf_counter()
      dx_cache["dx"] = ctx.denoised()
      timing["denoise_all_s"] = time.perf_counter() - t
    return dx_cache["dx"]

  x_full = lambda: np.asarray(to_float(ctx.data.images))
  fdx = ctx.table("fdx", lambda: ctx.features(dx_full(), "f(D(x))"))
  res = _RESAMPLES.value
  rows, ranks = {}, {}

  def add(name, r, **info):
    ranks[name] = r
    row = summary.row_summary(r, ctx.ks, resamples=res, seed=0)
    rows[name] = {"HR@10": row["HR@10"], "HR@10_ci95": row["ci95"]["HR@10"],
                  "NDCG@10": row["NDCG@10"], "NDCG@10_ci95": row["ci95"]["NDCG@10"],
                  "users": row["users"], **({"draws_HR@10": row["draws"]["HR@10"]}
                                           if "draws" in row else {}), **info}
    logging.info("%s HR@10 %.4f %s", name, row["HR@10"], row["ci95"]["HR@10"])

  add("VBPR f(x)", ctx.ranks(ctx.fx), features="f(x)")
  add("no visual (f = mean item)", ctx.ranks(np.zeros_like(ctx.fx)), features="0")
  add("OURS f(D(x))", ctx.ranks(fdx), features="f(D(x))")
  tables = {}
  for spec in _RANK_VARIANTS.value:
    source, ms, pad, draws = parse_variant(spec)
    t = time.perf_counter()
    src = dx_full if source == "dx" else x_full
    per_draw = [ctx.rand_table(source, ms, pad, d, draws, src) for d in range(draws)]
    timing[f"{spec}_s"] = time.perf_counter() - t
    label = f"rand({'D(x)' if source == 'dx' else 'x'}) s>={ms} {pad}"
    tables[spec] = per_draw
    add(f"{label}, 1 draw", np.stack([ctx.ranks(f) for f in per_draw]), source=source,
        min_scale=ms, pad=pad, draws=draws, averaged=1)
    for k in (int(a) for a in _AVERAGE.value):
      if k <= draws and k > 1:
        add(f"{label}, mean of {k} draws", ctx.ranks(np.mean(per_draw[:k], axis=0)),
            source=source, min_scale=ms, pad=pad, draws=k, averaged=k)
  comparisons = {}
  deployed = next((n for n in rows if n.startswith("rand(D(x)) s>=0.875 zero, 1 draw")), None)
  for name in rows:
    for base in ("VBPR f(x)", "OURS f(D(x))", deployed):
      if base is None or name == base or (base == deployed and not name.startswith("rand")):
        continue
      c = summary.comparison(ranks[name], ranks[base], ctx.ks, resamples=res, seed=0)
      comparisons[f"{name} - {base}"] = {"HR@10": c["HR@10"]["diff"], "ci95": c["HR@10"]["ci95"],
                                         "effect": c["HR@10"]["effect"]}
  timing["total_s"] = time.perf_counter() - t0
  return {"rows": rows, "comparisons": comparisons, "timing": timing}, {
      "fdx": fdx, "tables": tables, "ranks": ranks}


# ---- Part 3: retraining VBPR on the features it will be ranked on ------------------------------

def train_vbpr(ctx: Ctx, tables) -> dict:
  """VBPR trained as the run trained it (config.recommender, seed, triplets), on ``tables``
  [I, F] used in turn, one per epoch."""
  exp, rc = ctx.exp, ctx.config.recommender
  state = rec_training.initial_state(exp)
  epoch_fn = rec_training.make_epoch_fn(ctx.models.recommender, ctx.mesh)
  keys = splits.pair_keys(ctx.data.train_users, ctx.data.train_items, ctx.data.num_items)
  tables = [jax.device_put(jnp.asarray(t), sharding.replicated(ctx.mesh)) for t in tables]
  steps_on_data = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec(
      None, sharding.DATA_AXIS))
  for epoch in range(rc.epochs):
    triplets = rec_training.epoch_triplets(ctx.data, keys, seed=ctx.seed, epoch=epoch,
                                           batch_size=rc.batch_size)
    state, _ = epoch_fn(state, jax.device_put(triplets, steps_on_data),
                        tables[epoch % len(tables)])
  return state.params


def retrain_part(ctx: Ctx, ranked: dict) -> dict:
  t0 = time.perf_counter()
  res = _RESAMPLES.value
  spec = _RANK_VARIANTS.value[0]
  draws = ranked["tables"][spec]
  if len(draws) < 8:
    raise ValueError(f"retrain needs 8 draws of {spec}")
  test, train = draws[:4], draws[4:8]
  out = {"train_draws": [4, 5, 6, 7], "test_draws": [0, 1, 2, 3], "variant": spec}
  ranks = {}
  t = time.perf_counter()
  p = train_vbpr(ctx, [ctx.fx])  # Control: the run's own recipe on f(x).
  out["VBPR retrained on f(x) train_s"] = time.perf_counter() - t
  ranks["VBPR retrained on f(x) | f(x)"] = ctx.ranks(ctx.fx, p)
  out["control_max_abs_param_diff"] = float(max(
      np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
          jax.tree.leaves(p), jax.tree.leaves(ctx.params["recommender"]))))
  for name, tabs in (("VBPR retrained on f(D(x))", [ranked["fdx"]]),
                     ("VBPR retrained on rand(D(x))", train)):
    t = time.perf_counter()
    p = train_vbpr(ctx, tabs)
    out[f"{name} train_s"] = time.perf_counter() - t
    ranks[f"{name} | f(D(x))"] = ctx.ranks(ranked["fdx"], p)
    ranks[f"{name} | rand(D(x)), 1 draw"] = np.stack([ctx.ranks(f, p) for f in test])
    ranks[f"{name} | rand(D(x)), mean of 4"] = ctx.ranks(np.mean(test, axis=0), p)
  ranks["VBPR (run) | f(D(x))"] = ranked["ranks"]["OURS f(D(x))"]
  ranks["VBPR (run) | rand(D(x)), 1 draw"] = np.stack([ctx.ranks(f) for f in test])
  ranks["VBPR (run) | rand(D(x)), mean of 4"] = ctx.ranks(np.mean(test, axis=0))
  rows = {}
  for name, r in ranks.items():
    row = summary.row_summary(r, ctx.ks, resamples=res, seed=0)
    rows[name] = {"HR@10": row["HR@10"], "HR@10_ci95": row["ci95"]["HR@10"]}
  base = ranked["ranks"]["VBPR f(x)"]
  comps = {}
  for name, r in ranks.items():
    c = summary.comparison(r, base, ctx.ks, resamples=res, seed=0)["HR@10"]
    comps[f"{name} - VBPR f(x)"] = {"HR@10": c["diff"], "ci95": c["ci95"], "effect": c["effect"]}
  for a, b in (("VBPR retrained on rand(D(x)) | rand(D(x)), 1 draw",
                "VBPR (run) | rand(D(x)), 1 draw"),
               ("VBPR retrained on f(D(x)) | f(D(x))", "VBPR (run) | f(D(x))"),
               ("VBPR retrained on rand(D(x)) | rand(D(x)), 1 draw",
                "VBPR retrained on f(D(x)) | f(D(x))")):
    c = summary.comparison(ranks[a], ranks[b], ctx.ks, resamples=res, seed=0)["HR@10"]
    comps[f"{a} - {b}"] = {"HR@10": c["diff"], "ci95": c["ci95"], "effect": c["effect"]}
  out.update(rows=rows, comparisons=comps, seconds=time.perf_counter() - t0)
  return out


# ---- Tables ------------------------------------------------------------------------------

def print_subset(r):
  print(f"\nfeatures on {r['items']} items x {r['draws']} draws (mean cosine of normalised "
        f"features; score_noise = item-specific VBPR score change / clean score spread)")
  print(f"{'':28}{'cos f(x)':>10}{'cos f(Dx)':>10}{'cos Ef':>9}{'noise':>8}{'common':>8}")
  rows = {"f(D(x))": r["reference"]["fdx"], **r["pieces"], "rand(x) (no D), zero": r["rand_x_zero"]}
  for name, m in rows.items():
    print(f"{name:28}{m['cos_fx']:10.4f}{m['cos_fdx']:10.4f}{m['cos_Ef_fx']:9.4f}"
          f"{m.get('score_noise_vs_fx', float('nan')):8.3f}"
          f"{m.get('common_share_vs_fx', float('nan')):8.3f}")
  print("\nby drawn scale: cos to f(D(x)) (zero / border pad, at the drawn offset)")
  for z, b in zip(r["by_scale"]["scale_offset_zero"], r["by_scale"]["scale_offset_border"]):
    print(f"  s in [{z['scale'][0]:.3f}, {z['scale'][1]:.3f}) n={z['n']:5d}  "
          f"{z['cos_fdx'] or float('nan'):.4f} / {b['cos_fdx'] or float('nan'):.4f}")
  print("\nfixed scale, centred: cos to f(D(x)) zero / border")
  for row in r["sweep_centred"]["rows"]:
    print(f"  s={row['scale']:.3f}  {row['zero']['cos_fdx']:.4f} / {row['border']['cos_fdx']:.4f}")
  print(f"\nshares of 1 - cos(f(rand(D(x))), f(D(x))) = {r['loss_shares']['loss_full']:.4f}")
  for chain in ("offset_then_pad", "pad_then_offset"):
    steps = r["loss_shares"][chain]
    print(f"  {chain}: " + "; ".join(f"{s['step']} {s['share']:.0%}" for s in steps))


def print_ranking(r):
  users = next(iter(r["rows"].values()))["users"]
  print(f"\nclean sampled ranking, {users} users, 95% bootstrap intervals")
  for name, row in r["rows"].items():
    print(f"  {name:44} HR@10 {row['HR@10']:.4f} [{row['HR@10_ci95'][0]:.4f}, "
          f"{row['HR@10_ci95'][1]:.4f}]  NDCG@10 {row['NDCG@10']:.4f}")
  print("paired differences of HR@10")
  for name, c in r["comparisons"].items():
    print(f"  {name:70} {c['HR@10']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")


def print_retrain(r):
  print("\nVBPR retrained on the features it is ranked on")
  for name, row in r["rows"].items():
    print(f"  {name:52} HR@10 {row['HR@10']:.4f} [{row['HR@10_ci95'][0]:.4f}, "
          f"{row['HR@10_ci95'][1]:.4f}]")
  for name, c in r["comparisons"].items():
    print(f"  {name:100} {c['HR@10']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")


def main(argv):
  del argv
  ctx = Ctx(_WORKDIR.value)
  out = {"workdir": _WORKDIR.value, "preset": _PRESET.value, "config_diffs": ctx.config_diffs,
         "restored_recommender_step": ctx.rec_step,
         "denoiser": {k: ctx.config.denoiser[k] for k in ("rand_min_scale", "rand_pad",
                                                           "rand_order")},
         "data": {"users": int(ctx.data.num_users), "items": int(ctx.data.num_items),
                  "image_size": ctx.size},
         "jax": jax.__version__, "cpu_count": os.cpu_count(), "setup_s": ctx.setup_s}
  whole = {}
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      whole = json.load(f)
  previous = whole.get(_KEY.value, {}) if _KEY.value else whole
  if previous:  # Parts run separately accumulate in one file.
    previous["wall_s_this_call_before"] = previous.pop("wall_s_this_call", None)
    previous["parts_before"] = previous.pop("parts_this_call", None)
    out = {**previous, **out}
  if "subset" in _PARTS.value:
    out["subset"] = subset_part(ctx)
    print_subset(out["subset"])
  ranked = None
  if "ranking" in _PARTS.value or "retrain" in _PARTS.value:
    first = out.get("ranking", {}).get("timing")
    out["ranking"], ranked = ranking_part(ctx)
    if first and first.get("total_s", 0) > out["ranking"]["timing"]["total_s"]:
      out["ranking"]["timing_when_computed"] = first  # This call read the cached tables.
    print_ranking(out["ranking"])
  if "retrain" in _PARTS.value:
    out["retrain"] = retrain_part(ctx, ranked)
    print_retrain(out["retrain"])
  out["wall_s_this_call"] = time.perf_counter() - T0
  out["parts_this_call"] = list(_PARTS.value)
  if "provenance" in out and out["provenance"].get("command") != provenance.describe()["command"]:
    out.setdefault("earlier_calls", []).append(
        {"provenance": out["provenance"], "wall_s": out.get("wall_s_this_call_before"),
         "parts": out.get("parts_before")})
  out.pop("wall_s_this_call_before", None)
  out.pop("parts_before", None)
  out["provenance"] = provenance.describe()
  wall = out["wall_s_this_call"]
  if _KEY.value:
    out = {**whole, _KEY.value: out}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1, default=float)
  print(f"\nwritten {_OUT.value} ({wall:.0f} s)")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
