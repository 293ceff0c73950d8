"""One loop over the plan: every condition is crafted (or loaded from the attack cache), its
photos' features extracted through every system it ranks, and every row scored under both
protocols (sampled: the held-out item among the saved negatives, paper 4.2; full: among
every item the user did not buy). Detection and the denoiser's fidelity are scored on the
full-catalogue conditions, targeted promotion by its own list metrics.

:class:`EvalContext` holds what every step needs (models, weights, data, mesh, config,
the attack cache and the item groups); :func:`evaluate_all` runs a plan
(:mod:`jaxvars.evaluation.plan`) and returns every table of results.json.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.attacks.whitebox import uses_deployed_table
from jaxvars.conditions import CLEAN, row_key
from jaxvars.defenses import SYSTEMS, UNDEFENDED, row_name
from jaxvars.defenses.systems import GATE_THRESHOLD
from jaxvars.errors import ConfigError
from jaxvars.evaluation import adaptive, checks, tables
from jaxvars.evaluation.full_ranking import full_ranks
from jaxvars.evaluation.plan import MOSTPOP, Condition, row_order
from jaxvars.evaluation.rank_metrics import FULL_METRICS
from jaxvars.evaluation.ranking import (candidate_matrix, candidate_scores, mostpop_scores,
                                        positive_ranks)
from jaxvars.evaluation.system_features import systems_features
from jaxvars.evaluation.targeted import Targeted
from jaxvars.progress import memory_gb
from jaxvars.workdir import FULL_RANKS_PREFIX, RANKS_PREFIX

SUBSET_KINDS = ("adaptive", "whitebox", "sanity")  # Ranked on the attacked users' rows.


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every condition's steps need.

  Attributes:
    models, params, consts, data, mesh, config: the run's (``jaxvars.experiment``).
    systems: the evaluated systems (registered names), in table order.
    eval_items: items the defence never trained on (users whose held-out item is one of
      them form the 'unseen' group). holdout: the detection items (a subset of them).
    calibration: clean items of the defence's training pool that set the threshold.
    cache_dir: where attacked photos are kept (None: not kept).
  """
  models: object
  params: dict
  consts: dict
  data: object
  mesh: object
  config: object
  systems: tuple[str, ...]
  eval_items: np.ndarray
  holdout: np.ndarray
  calibration: np.ndarray
  cache_dir: str | None = None

  @property
  def batch_size(self) -> int:
    return int(self.config.attack.batch_size)

  def features(self, systems, images: np.ndarray, items: np.ndarray | None = None) -> dict:
    """{system: float32 [I, F] or [K, I, F]} of uint8 photos [I, S, S, 3] of ``items``."""
    return systems_features(systems, models=self.models, params=self.params, consts=self.consts,
                            images=images, mesh=self.mesh, batch_size=self.batch_size,
                            config=self.config, seed=self.config.seed,
                            draws=int(self.config.eval.rand_draws), items=items)

  def craft(self, cond: Condition, items: np.ndarray | None, threshold: float | None,
            table: np.ndarray | None = None):
    """(uint8 attacked photos of ``items`` (all: None), stats) of ``cond``, from the cache;
    ``table``: its objective's item table (:func:`deployed_table`; None: the clean one)."""
    spec = cond.spec
    return cached_attack_catalogue(
        spec, cache_dir=self.cache_dir, models=self.models, params=self.params,
        consts=self.consts, data=self.data, mesh=self.mesh, batch_size=self.batch_size,
        config=self.config, items=items,
        **({"threshold": threshold} if spec.detector_lambda > 0 else {}),
        **({"table": table} if table is not None else {}))


def deployed_table(ctx: EvalContext, spec, clean_feats: dict) -> np.ndarray | None:
  """The item table a white-box attack's objective reads where
  ``config.attack.whitebox_table='deployed'``: the attacked system's (``spec.through``) own
  features of the clean catalogue, float32 [I, F] ([K, I, F]: a randomised system's draws),
  those it ranks the unattacked items with (``clean_feats``, from the clean condition, or
  computed here); None for the clean table (the option off, or not a white-box attack)."""
  if spec is None or not uses_deployed_table(spec, ctx.config):
    return None
  if spec.through not in clean_feats:
    clean_feats[spec.through] = ctx.features([spec.through], ctx.data.images)[spec.through]
  return np.asarray(clean_feats[spec.through])


class _Scores:
  """Every row's per-user ranks under both protocols, and the row records."""

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx
    data = ctx.data
    self.cands = candidate_matrix(data.test_items, data.eval_negatives)
    self.sampled, self.full, self.rows = {}, {}, {}
    self.full_s = 0.0  # Seconds spent ranking over all items (the full protocol).

  def add(self, key: str, system: str, condition: str, feats: np.ndarray,
          gate_of: str | None = None) -> None:
    """Ranks of features [I, F] ([K, I, F]: [K, U]) under both protocols."""
    ctx, e = self.ctx, self.ctx.config.eval
    rec, p = ctx.models.recommender, ctx.params["recommender"]
    stack = feats if feats.ndim == 3 else feats[None]
    sampled = []
    for f in stack:
      scores = candidate_scores(rec, p, jnp.asarray(f), self.cands, e.batch_users)
      sampled.append(positive_ranks(scores[:, 0], scores[:, 1:]))
    self.sampled[key] = np.stack(sampled) if feats.ndim == 3 else sampled[0]
    t = time.perf_counter()
    self.full[key] = full_ranks(rec, p, feats, test_items=ctx.data.test_items,
                                train_users=ctx.data.train_users,
                                train_items=ctx.data.train_items, batch_users=e.batch_users)
    self.full_s += time.perf_counter() - t
    self.rows[key] = {"system": system, "condition": condition, "gate_of": gate_of}

  def add_mostpop(self) -> None:
    data = self.ctx.data
    pop = mostpop_scores(data.train_items, data.num_items)
    s = pop[self.cands]
    key = row_key(MOSTPOP, CLEAN)
    self.sampled[key] = positive_ranks(s[:, 0], s[:, 1:])
    self.full[key] = mostpop_full_ranks(pop, data.test_items, data.train_users, data.train_items)
    self.rows[key] = {"system": MOSTPOP, "condition": CLEAN, "gate_of": None, "baseline": True}


def mostpop_full_ranks(pop: np.ndarray, test_items, train_users, train_items) -> np.ndarray:
  """Full-protocol ranks [U] of the most-popular baseline (scores ``pop`` [I], the same for
  every user): items not bought in training, other than the held-out one, scoring >= it."""
  test_items = np.asarray(test_items)
  ordered = np.sort(pop)
  p = pop[test_items]
  at_least = len(pop) - np.searchsorted(ordered, p, side="left")  # Itself included.
  users, items = np.asarray(train_users), np.asarray(train_items)
  pairs = np.unique(np.stack([users, items], axis=1), axis=0)
  pairs = pairs[pairs[:, 1] != test_items[pairs[:, 0]]]  # The held-out item counted once.
  bought = np.bincount(pairs[:, 0], weights=pop[pairs[:, 1]] >= p[pairs[:, 0]],
                       minlength=len(test_items))
  return (at_least - 1 - bought).astype(np.int64)


def evaluate_all(ctx: EvalContext, plan: list[Condition], *, detect: bool = True,
                 fidelity: bool = True, mostpop: bool = True, baselines: bool = True) -> dict:
  """Every table of results.json for the conditions of ``plan``.

  Args:
    detect: score detection (trained detector). fidelity: measure D's image fidelity.
    mostpop: add the most-popular baseline on clean data.
    baselines: with ``detect``, also score the detection baselines of
      ``config.detector.baselines`` (feature squeezing) on the same photos.

  Returns:
    {'ranking', 'ranking_unseen', 'ranking_seen', ('ranking_attacked': every row on the
    users whose held-out item the item-subset attacks perturbed, where ``eval.max_items``
    leaves some unattacked), 'comparisons', 'robust', 'users', 'detection',
    'detection_noise', 'detection_baselines', 'fidelity', 'attack', 'targeted', 'systems',
    'ranking_full',
    'comparisons_full', 'conditions', 'rows', 'timing', 'artifacts'}.

  Raises:
    ConfigError: a gated system is evaluated without a trained detector to calibrate.
  """
  config, data = ctx.config, ctx.data
  rec = ctx.models.recommender
  names = {s: row_name(s, rec.name) for s in ctx.systems}
  timing = {"ranking_s": 0.0}
  attack, artifacts = {}, {}
  scores = _Scores(ctx)
  if mostpop:
    scores.add_mostpop()
  gated = [s for s in ctx.systems if SYSTEMS.get(s).gated]
  det = None
  if detect and (any(c.kind == "transfer" for c in plan) or gated):
    det = checks.Detection(ctx.models, ctx.params, ctx.consts, data, ctx.mesh, config,
                           ctx.holdout, ctx.calibration, timing, artifacts, baselines=baselines)
  if gated:
    if det is None:
      raise ConfigError(f"systems {gated} gate on the detector, which this evaluation does not "
                        f"calibrate (a trained detector is needed)")
    # The deployed threshold, an input of the gated systems' features (and of nothing else).
    ctx = dataclasses.replace(ctx, consts={**ctx.consts, GATE_THRESHOLD: jnp.float32(det.threshold)})
  fid = checks.Fidelity(ctx.models, ctx.params, ctx.consts, data, ctx.holdout, config,
                        gated=bool(gated)) if fidelity else None
  subset = adaptive.attack_items(data, int(config.eval.max_items), int(config.attack.seed))
  idx = np.arange(data.num_items, dtype=np.int32) if subset is None else subset
  clean_feats, targeted, rows_of = {}, None, {}
  for cond in plan:
    t = t_cond = time.perf_counter()
    before = set(scores.rows)
    if cond.kind in ("clean", "transfer"):  # Every item's photo; one catalogue in memory.
      if cond.kind == "clean":
        images = data.images
      else:
        images, attack[cond.name] = ctx.craft(cond, None, None)
      t = time.perf_counter()  # ranking_s: features and ranks (crafting is timed apart).
      computed = [s for s in cond.systems if not (s == UNDEFENDED and cond.kind == "clean")]
      feats = ctx.features(computed, images) if computed else {}
      if cond.kind == "clean" and UNDEFENDED in cond.systems:
        feats[UNDEFENDED] = np.asarray(ctx.consts["features"])
      if cond.kind == "clean":
        clean_feats = dict(feats)  # The subset attacks splice their items into these.
      for s in cond.systems:
        scores.add(row_key(names[s], cond.name), names[s], cond.name, feats.pop(s))
      timing["ranking_s"] += time.perf_counter() - t
      if det is not None:
        det.condition(cond.name, images, attacked=cond.kind != "clean", artifacts=artifacts)
      if fid is not None:
        fid.condition(cond.name, images)
      del images
    elif cond.kind in SUBSET_KINDS:
      _subset_condition(ctx, cond, scores, attack, clean_feats, names, det, subset, idx)
      timing["adaptive_s"] = timing.get("adaptive_s", 0.0) + time.perf_counter() - t
    elif cond.kind == "targeted":
      if targeted is None:
        targeted = Targeted(models=ctx.models, params=ctx.params, consts=ctx.consts, data=data,
                            mesh=ctx.mesh, config=config, systems=list(ctx.systems),
                            clean_feats=clean_feats, detector=det)
        logging.info("targeted: %d attacks on %d target items (%s), %d systems",
                     sum(c.kind == "targeted" for c in plan), len(targeted.targets),
                     targeted.results["source_category"] or "no category", len(ctx.systems))
      if cond.spec is not None and cond.spec.objective == "taamr" and not targeted.has_logits:
        logging.info("targeted %s skipped: the backbone has no classifier head", cond.name)
        continue
      adv, stats = targeted.craft(cond.spec, deployed_table(ctx, cond.spec, clean_feats))
      feats = ctx.features(cond.systems, adv, items=targeted.targets)
      targeted.score(cond.name, cond.threat, adv, feats, stats)
      timing["targeted_s"] = timing.get("targeted_s", 0.0) + time.perf_counter() - t
    elif cond.kind == "floor":  # The no-visual level: every item's visual feature the mean.
      zero = np.zeros_like(np.asarray(ctx.consts["features"]))
      for s in cond.systems:
        scores.add(row_key(names[s], cond.name), names[s], cond.name, zero)
    else:
      raise ConfigError(f"evaluation condition {cond.name!r} has an unknown kind {cond.kind!r}")
    rows_of.setdefault(id(cond), [k for k in scores.rows if k not in before])
    now, peak = memory_gb()
    logging.info("condition %s done in %.1f s; host memory %.2f GB (peak so far %.2f GB)",
                 cond.name, time.perf_counter() - t_cond, now, peak)
  if targeted is not None:
    artifacts.update(targeted.artifacts)
  return _results(ctx, plan, scores, rows_of, names, mostpop=mostpop, det=det, fid=fid,
                  attack=attack, targeted=targeted.results if targeted else {},
                  timing=timing, artifacts=artifacts, subset=subset)


def _subset_condition(ctx, cond, scores, attack, clean_feats, names, det, subset, idx) -> None:
  """An item-subset attack: crafts (or loads) the photos of ``idx`` only, ranks every
  system with their features spliced into the clean catalogue's, and for a gated condition
  also the rows where flagged uploads are rejected (the item keeps its clean photo)."""
  threshold = det.threshold if det is not None else None
  images, stats = ctx.craft(cond, subset, threshold, deployed_table(ctx, cond.spec, clean_feats))
  feats = ctx.features(cond.systems, images, items=idx)
  for s in cond.systems:
    scores.add(row_key(names[s], cond.name), names[s], cond.name,
               adaptive.splice(clean_feats[s], subset, feats[s]))
  if cond.gated and det is not None:
    flagged = det.scores(images) > det.threshold
    stats = dict(stats, pass_rate=float(np.mean(~flagged)))
    for s in cond.systems:
      kept = adaptive.splice(clean_feats[s], idx[~flagged], feats[s][..., ~flagged, :])
      scores.add(row_key(names[s] + "+gate", cond.name), names[s] + "+gate", cond.name, kept,
                 gate_of=names[s])
  attack[cond.cache_key] = dict(stats, systems=list(cond.systems))


def _results(ctx, plan, scores, rows_of, names, *, mostpop, det, fid, attack, targeted, timing,
             artifacts, subset) -> dict:
  config, data = ctx.config, ctx.data
  unseen = np.isin(data.test_items, ctx.eval_items)
  order = [k for k in row_order(plan, names, mostpop) if k in scores.rows]
  sampled = {k: scores.sampled[k] for k in order}
  full = {k: scores.full[k] for k in order}
  rows = {k: scores.rows[k] for k in order}
  with_subset = any(c.kind in SUBSET_KINDS for c in plan)
  attacked = adaptive.attacked_users(data.test_items, subset) if with_subset else None
  partial = {k for c in plan if c.kind in SUBSET_KINDS for k in rows_of.get(id(c), [])}
  conds = list(dict.fromkeys(c.name for c in plan if c.kind != "targeted"))
  longer = {c.name: c.compare_with for c in plan if c.compare_with}
  system_names = list(names.values())
  pairs, steps = tables.comparison_pairs(rows, system_names, conds, longer)
  out = tables.ranking_tables(sampled, config, unseen, partial=partial, attacked=attacked)
  out["comparisons"] = tables.comparisons(sampled, pairs, config, unseen, partial=partial,
                                          attacked=attacked, longer=steps)
  eps_of = {c.name: (float(c.spec.eps) if c.spec is not None else None) for c in plan}
  pair_rows = {k: (r["system"], r["condition"]) for k, r in rows.items()}
  out["robust"] = tables.worst_case(sampled, pair_rows, eps_of, system_names, config, unseen,
                                    attacked=attacked)
  out["users"] = {"all": int(len(unseen)), "unseen": int(unseen.sum()),
                  "seen": int((~unseen).sum())}
  if attacked is not None:
    out["users"]["attacked"] = int(attacked.sum())
    artifacts["attacked_users"] = attacked
  artifacts.update({f"{RANKS_PREFIX}{k}": np.asarray(v, np.int16) for k, v in sampled.items()})
  artifacts.update({f"{FULL_RANKS_PREFIX}{k}": np.asarray(v, np.int32) for k, v in full.items()})
  artifacts["unseen_users"] = unseen
  out.update({"detection": det.results if det else {},
              "detection_noise": det.noise() if det else {}})
  out.update({"detection_baselines": det.baseline_results() if det else {},  # After noise().
              "fidelity": fid.results if fid else {}, "attack": attack, "targeted": targeted,
              "systems": tables.systems_table(ctx.systems, ctx.models.recommender, config)})
  t = time.perf_counter()
  out.update(tables.ranking_tables(full, config, unseen, partial=partial, attacked=attacked,
                                   metrics=FULL_METRICS, sections=("ranking_full", None, None)))
  out["comparisons_full"] = tables.comparisons(full, pairs, config, unseen, partial=partial,
                                               attacked=attacked, metrics=FULL_METRICS)
  timing["full_ranking_s"] = scores.full_s + time.perf_counter() - t  # Ranks and tables.
  out["conditions"] = [c.record(rows_of.get(id(c), [])) for c in plan]
  out["rows"] = rows
  out.update({"timing": timing, "artifacts": artifacts})
  return out
