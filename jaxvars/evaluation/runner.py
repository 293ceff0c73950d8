"""Every system under every condition: the tables of results.json.

Conditions are ``clean`` and one attacked catalogue per attack spec (crafted once against
the undefended recommender, cached, and reused by every system: the paper's threat
model). Systems are registered in :data:`jaxvars.defenses.SYSTEMS`; a system's rows are
``<row name>/<condition>`` (``jaxvars.defenses.row_name``). Every ranking number carries a
95% bootstrap interval over users and is also given for the users whose held-out item the
defence never trained on (``ranking_unseen``) and for the others (``ranking_seen``);
detection is scored on items the defence never trained on, with intervals over items.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.conditions import CLEAN, row_key
from jaxvars.defenses import SYSTEMS, UNDEFENDED, row_name
from jaxvars.evaluation import checks, summary
from jaxvars.evaluation.ranking import (candidate_matrix, candidate_scores, mostpop_scores,
                                        positive_ranks)
from jaxvars.evaluation.system_features import systems_features


def systems_table(systems, recommender, config) -> dict:
  """The ``systems`` section of results.json: {row name: {'system', 'label', 'description',
  'settings'}}."""
  out = {}
  for name in systems:
    s = SYSTEMS.get(name)
    out[row_name(name, recommender.name)] = {
        "system": name, "label": s.label or recommender.label, "description": s.description,
        "settings": s.settings(config), "randomized": s.randomized}
  return out


def _ranks(recommender, rec_params, feats: np.ndarray, cands: np.ndarray,
           batch_users: int) -> np.ndarray:
  """Ranks [U] of features [I, F], or [K, U] of features [K, I, F]."""
  if feats.ndim == 3:
    return np.stack([_ranks(recommender, rec_params, f, cands, batch_users) for f in feats])
  scores = candidate_scores(recommender, rec_params, jnp.asarray(feats), cands, batch_users)
  return positive_ranks(scores[:, 0], scores[:, 1:])


def _tables(ranks: dict, config, unseen: np.ndarray) -> dict:
  ks, e = tuple(config.eval.ks), config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  out = {"ranking": {}, "ranking_unseen": {}, "ranking_seen": {}}
  for key, r in ranks.items():
    out["ranking"][key] = summary.row_summary(r, ks, **kw)
    out["ranking_unseen"][key] = summary.row_summary(r, ks, users=unseen, **kw)
    out["ranking_seen"][key] = summary.row_summary(r, ks, users=~unseen, **kw)
  return out


def _comparisons(ranks: dict, systems: list[str], conditions: list[str], config,
                 unseen: np.ndarray) -> dict:
  """Paired differences, all users and unseen users: every system under every attack vs
  itself on clean photos; every other system vs the undefended one under each condition."""
  ks, e = tuple(config.eval.ks), config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  pairs = []
  for s in systems:
    pairs += [(row_key(s, c), row_key(s, CLEAN)) for c in conditions if c != CLEAN]
  for s in systems[1:]:
    pairs += [(row_key(s, c), row_key(systems[0], c)) for c in conditions]
  out = {}
  for a, b in pairs:
    if a in ranks and b in ranks:
      out[f"{a} - {b}"] = {
          "all": summary.comparison(ranks[a], ranks[b], ks, **kw),
          "unseen": summary.comparison(ranks[a], ranks[b], ks, users=unseen, **kw)}
  return out


def evaluate_all(*, models, params, consts, data, mesh, config, eval_items: np.ndarray,
                 holdout: np.ndarray, calibration: np.ndarray, systems, specs,
                 detect: bool = True, fidelity: bool = True, cache_dir: str | None = None,
                 mostpop: bool = True) -> dict:
  """Every table of results.json.

  Args:
    eval_items: items the defence never trained on (users whose held-out item is one of
      them are the 'unseen' group). holdout: the detection items (a subset of them).
    calibration: clean items of the defence's training pool that set the threshold.
    systems: names of registered systems to rank. specs: the attacks (one condition each).
    detect: score detection (trained detector). fidelity: measure D's image fidelity.
    cache_dir: where attacked catalogues are kept (None: not kept).
    mostpop: add the most-popular baseline on clean data.

  Returns:
    {'ranking', 'ranking_unseen', 'ranking_seen', 'comparisons', 'detection',
    'detection_noise', 'fidelity', 'attack', 'systems', 'timing', 'artifacts'}.
  """
  bs, e = config.attack.batch_size, config.eval
  rec = models.recommender
  cands = candidate_matrix(data.test_items, data.eval_negatives)
  unseen = np.isin(data.test_items, eval_items)
  timing = {"ranking_s": 0.0}
  ranks = {}
  if mostpop:
    pop = mostpop_scores(data.train_items, data.num_items)[cands]
    ranks[row_key("mostpop", CLEAN)] = positive_ranks(pop[:, 0], pop[:, 1:])
  conditions = [(CLEAN, None)] + [(spec.condition, spec) for spec in specs]
  names = [row_name(s, rec.name) for s in systems]
  attack, artifacts = {}, {}
  det = checks.Detection(models, params, consts, data, mesh, config, holdout, calibration,
                         timing, artifacts) if detect and len(conditions) > 1 else None
  fid = checks.Fidelity(models, params, consts, data, holdout, config) if fidelity else None
  # One attacked catalogue in memory at a time (a cached one is memory-mapped).
  for cond, spec in conditions:
    if spec is None:
      images = data.images
    else:
      images, attack[cond] = cached_attack_catalogue(
          spec, cache_dir=cache_dir, models=models, rec_params=params["recommender"],
          consts=consts, data=data, mesh=mesh, batch_size=bs)
    t = time.perf_counter()
    computed = [s for s in systems if not (s == UNDEFENDED and spec is None)]
    feats = systems_features(computed, models=models, params=params, consts=consts,
                             images=images, mesh=mesh, batch_size=bs, config=config,
                             seed=config.seed, draws=int(e.rand_draws)) if computed else {}
    if UNDEFENDED in systems and spec is None:
      feats[UNDEFENDED] = np.asarray(consts["features"])
    for sys_name, name in zip(systems, names):
      ranks[row_key(name, cond)] = _ranks(rec, params["recommender"], feats.pop(sys_name),
                                          cands, e.batch_users)
    timing["ranking_s"] += time.perf_counter() - t
    if det is not None:
      det.condition(cond, images, attacked=spec is not None, artifacts=artifacts)
    if fid is not None:
      fid.condition(cond, images)
    del images
  # Rows grouped by system, conditions in sweep order (the layout of the printed table).
  order = [row_key(s, c) for s in ["mostpop"] + names for c, _ in conditions]
  ranks = {k: ranks[k] for k in order if k in ranks}
  out = _tables(ranks, config, unseen)
  out["comparisons"] = _comparisons(ranks, names, [c for c, _ in conditions], config, unseen)
  out["users"] = {"all": int(len(unseen)), "unseen": int(unseen.sum()),
                  "seen": int((~unseen).sum())}
  artifacts.update({f"ranks/{k}": np.asarray(v, np.int16) for k, v in ranks.items()})
  artifacts["unseen_users"] = unseen
  out.update({"detection": det.results if det else {},
              "detection_noise": det.noise() if det else {},
              "fidelity": fid.results if fid else {}, "attack": attack,
              "systems": systems_table(systems, rec, config), "timing": timing,
              "artifacts": artifacts})
  return out
