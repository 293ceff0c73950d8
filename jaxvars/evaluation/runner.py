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
from jaxvars.conditions import CLEAN, parse_condition, parse_row_key, row_key
from jaxvars.defenses import SYSTEMS, UNDEFENDED, row_name
from jaxvars.defenses.systems import GATE_THRESHOLD
from jaxvars.errors import ConfigError
from jaxvars.evaluation import adaptive, checks, summary
from jaxvars.evaluation.ranking import (candidate_matrix, candidate_scores, mostpop_scores,
                                        positive_ranks)
from jaxvars.evaluation.system_features import systems_features
from jaxvars.evaluation.targeted import evaluate_targeted


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


def _users(key_or_keys, partial: set, attacked: np.ndarray | None, group: np.ndarray | None):
  """The user mask a row (or a pair of rows) is scored on: ``group`` (None = all users),
  narrowed to the ``attacked`` users where a row is an item-subset attack's (``partial``)."""
  keys = (key_or_keys,) if isinstance(key_or_keys, str) else key_or_keys
  if attacked is None or not any(k in partial for k in keys):
    return group
  return attacked if group is None else group & attacked


def _tables(ranks: dict, config, unseen: np.ndarray, *, partial: set = frozenset(),
            attacked: np.ndarray | None = None) -> dict:
  """{'ranking', 'ranking_unseen', 'ranking_seen'} (+ 'ranking_attacked', every row on the
  ``attacked`` users, where given): one row summary per rank array. Rows in ``partial``
  (item-subset attacks) are scored on the ``attacked`` users only."""
  ks, e = tuple(config.eval.ks), config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  out = {"ranking": {}, "ranking_unseen": {}, "ranking_seen": {}}
  if attacked is not None:
    out["ranking_attacked"] = {}
  for key, r in ranks.items():
    for section, group in (("ranking", None), ("ranking_unseen", unseen),
                           ("ranking_seen", ~unseen)):
      out[section][key] = summary.row_summary(
          r, ks, users=_users(key, partial, attacked, group), **kw)
    if attacked is not None:
      out["ranking_attacked"][key] = summary.row_summary(r, ks, users=attacked, **kw)
  return out


def _comparisons(ranks: dict, systems: list[str], conditions: list[str], config,
                 unseen: np.ndarray, *, partial: set = frozenset(),
                 attacked: np.ndarray | None = None) -> dict:
  """Paired differences, all users and unseen users: every system under every attack vs
  itself on clean photos; every other system vs the undefended one under each condition.
  A pair with an item-subset attack's row (``partial``) is paired on the ``attacked`` users.
  The more-steps sanity pairs ('-2xsteps' vs the same attack) also compare the held-out
  item's mean rank (``'mean_rank'``, :func:`summary.rank_comparison`)."""
  ks, e = tuple(config.eval.ks), config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  pairs, longer = [], set()
  for s in systems:
    pairs += [(row_key(s, c), row_key(s, CLEAN)) for c in conditions
              if c not in (CLEAN, "no_visual")]
    pairs += [(row_key(f"{s}+gate", c), row_key(s, c)) for c in conditions]
    steps = [(row_key(s, c), row_key(s, c.replace("-2xsteps", ""))) for c in conditions
             if "-2xsteps" in c]
    pairs += steps
    longer.update(steps)
  for s in systems[1:]:
    pairs += [(row_key(s, c), row_key(systems[0], c)) for c in conditions]
  out = {}
  for a, b in pairs:
    if a in ranks and b in ranks:
      out[f"{a} - {b}"] = {}
      for group, among in (("all", None), ("unseen", unseen)):
        users = _users((a, b), partial, attacked, among)
        out[f"{a} - {b}"][group] = summary.comparison(ranks[a], ranks[b], ks, users=users, **kw)
        if (a, b) in longer:  # Carlini's more-steps check: also every user's rank (report).
          out[f"{a} - {b}"][group]["mean_rank"] = summary.rank_comparison(
              ranks[a], ranks[b], users=users, **kw)
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
    {'ranking', 'ranking_unseen', 'ranking_seen', ('ranking_attacked': every row on the
    users whose held-out item the item-subset attacks perturbed, where ``eval.max_items``
    leaves some unattacked), 'comparisons', 'detection',
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
  attack, artifacts, clean_feats = {}, {}, {}
  gated = [s for s in systems if SYSTEMS.get(s).gated]
  det = checks.Detection(models, params, consts, data, mesh, config, holdout, calibration,
                         timing, artifacts) if detect and (len(conditions) > 1 or gated) else None
  if gated:
    if det is None:
      raise ConfigError(f"systems {gated} gate on the detector, which this evaluation does not "
                        f"calibrate (a trained detector is needed)")
    consts = {**consts, GATE_THRESHOLD: jnp.float32(det.threshold)}
  fid = checks.Fidelity(models, params, consts, data, holdout, config,
                        gated=bool(gated)) if fidelity else None
  # One attacked catalogue in memory at a time (a cached one is memory-mapped).
  for cond, spec in conditions:
    if spec is None:
      images = data.images
    else:
      images, attack[cond] = cached_attack_catalogue(
          spec, cache_dir=cache_dir, models=models, params=params, consts=consts, data=data,
          mesh=mesh, batch_size=bs, config=config)
    t = time.perf_counter()
    computed = [s for s in systems if not (s == UNDEFENDED and spec is None)]
    feats = systems_features(computed, models=models, params=params, consts=consts,
                             images=images, mesh=mesh, batch_size=bs, config=config,
                             seed=config.seed, draws=int(e.rand_draws)) if computed else {}
    if UNDEFENDED in systems and spec is None:
      feats[UNDEFENDED] = np.asarray(consts["features"])
    if spec is None:
      clean_feats = dict(feats)  # The extra attacks splice their items into these.
    for sys_name, name in zip(systems, names):
      ranks[row_key(name, cond)] = _ranks(rec, params["recommender"], feats.pop(sys_name),
                                          cands, e.batch_users)
    timing["ranking_s"] += time.perf_counter() - t
    if det is not None:
      det.condition(cond, images, attacked=spec is not None, artifacts=artifacts)
    if fid is not None:
      fid.condition(cond, images)
    del images
  extras = adaptive.extra_attacks(config, systems, detector=det is not None)
  subset = adaptive.attack_items(data, int(e.max_items), int(config.attack.seed))
  attacked = adaptive.attacked_users(data.test_items, subset) if extras else None
  partial = set()  # Rows of the item-subset attacks (scored on `attacked` users where given).
  if extras:
    t = time.perf_counter()
    before = set(ranks)
    _extra_conditions(extras, ranks, attack, clean_feats, models=models, params=params,
                      consts=consts, data=data, mesh=mesh, config=config, det=det,
                      cache_dir=cache_dir, cands=cands, names=dict(zip(systems, names)),
                      subset=subset)
    partial = set(ranks) - before
    timing["adaptive_s"] = time.perf_counter() - t
  targeted = {}
  if (config.get("targeted") and config.targeted.num_targets and UNDEFENDED in systems
      and rec.uses_features):  # Photos play no part in a recommender without features.
    t = time.perf_counter()
    targeted, art = evaluate_targeted(models=models, params=params, consts=consts, data=data,
                                      mesh=mesh, config=config, systems=systems,
                                      clean_feats=clean_feats, detector=det)
    artifacts.update(art)
    timing["targeted_s"] = time.perf_counter() - t
  if UNDEFENDED in systems and rec.uses_features:  # The no-visual level: every item's
    # visual feature the mean.
    zero = np.zeros_like(np.asarray(consts["features"]))
    ranks[row_key(row_name(UNDEFENDED, rec.name), "no_visual")] = _ranks(
        rec, params["recommender"], zero, cands, e.batch_users)
  # Rows grouped by system, conditions in sweep order (the layout of the printed table).
  conds = [c for c, _ in conditions] + list(dict.fromkeys(
      parse_row_key(k)[1] for k in ranks if parse_row_key(k)[1] not in
      [c for c, _ in conditions]))
  order = [row_key(s, c) for s in ["mostpop"] + [
      n for s_ in names for n in (s_, f"{s_}+gate")] for c in conds]
  ranks = {k: ranks[k] for k in order if k in ranks}
  out = _tables(ranks, config, unseen, partial=partial, attacked=attacked)
  out["comparisons"] = _comparisons(ranks, names, conds, config, unseen, partial=partial,
                                    attacked=attacked)
  out["robust"] = _robust(ranks, names, config, unseen, attacked=attacked)
  out["users"] = {"all": int(len(unseen)), "unseen": int(unseen.sum()),
                  "seen": int((~unseen).sum())}
  if attacked is not None:
    out["users"]["attacked"] = int(attacked.sum())
    artifacts["attacked_users"] = attacked
  artifacts.update({f"ranks/{k}": np.asarray(v, np.int16) for k, v in ranks.items()})
  artifacts["unseen_users"] = unseen
  out.update({"detection": det.results if det else {},
              "detection_noise": det.noise() if det else {},
              "fidelity": fid.results if fid else {}, "attack": attack, "targeted": targeted,
              "systems": systems_table(systems, rec, config), "timing": timing,
              "artifacts": artifacts})
  return out


def _extra_conditions(extras, ranks: dict, attack: dict, clean_feats: dict, *, models, params,
                      consts, data, mesh, config, det, cache_dir, cands, names: dict,
                      subset: np.ndarray | None) -> None:
  """Runs :mod:`jaxvars.evaluation.adaptive`'s attacks on the item ``subset`` (None: every
  item) and adds their rows (and gated rows, pass rates) to ``ranks`` and ``attack``."""
  e, bs = config.eval, config.attack.batch_size
  rec = models.recommender
  idx = np.arange(data.num_items, dtype=np.int32) if subset is None else subset
  for extra in extras:
    images, stats = adaptive.craft(
        extra, items=subset, threshold=det.threshold if det is not None else None,
        cache_dir=cache_dir, models=models, params=params, consts=consts, data=data, mesh=mesh,
        batch_size=bs, config=config)
    attacked = images[idx]
    feats = systems_features(extra.systems, models=models, params=params, consts=consts,
                             images=attacked, mesh=mesh, batch_size=bs, config=config,
                             seed=config.seed, draws=int(e.rand_draws), items=idx)
    cond = extra.spec.condition
    for sys_name in extra.systems:
      full = adaptive.splice(clean_feats[sys_name], subset, feats[sys_name])
      ranks[row_key(names[sys_name], cond)] = _ranks(rec, params["recommender"], full, cands,
                                                     e.batch_users)
    if extra.gated and det is not None:
      flagged = det.scores(attacked) > det.threshold
      stats = dict(stats, pass_rate=float(np.mean(~flagged)))
      for sys_name in extra.systems:  # Flagged uploads are rejected: the clean photo stays.
        kept = adaptive.splice(clean_feats[sys_name], idx[~flagged],
                               feats[sys_name][..., ~flagged, :])
        ranks[row_key(names[sys_name] + "+gate", cond)] = _ranks(
            rec, params["recommender"], kept, cands, e.batch_users)
    attack[extra.key] = dict(stats, systems=list(extra.systems))
    del images, attacked, feats


def _robust(ranks: dict, names: list[str], config, unseen: np.ndarray, *,
            attacked: np.ndarray | None = None) -> dict:
  """The worst case per system (AutoAttack-style robust accuracy): a user counts as a hit
  only if the held-out item stays in the top N under every attack at the report's eps
  (``config.ablation.eps``; rejected uploads, the '+gate' rows, not counted as attacks of
  the ungated system), over the ``attacked`` users (bool [U]: those whose held-out item
  every attack perturbed; None = all users).
  {row name: {metrics, 'ci95', 'users', 'attacks', 'unseen': {...}}}."""
  ks, e = tuple(config.eval.ks), config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  eps = float(config.ablation.get("eps", 8.0))
  users = attacked
  out = {}
  for name in names:
    rows = {k: r for k, r in ranks.items() if parse_row_key(k)[0] == name
            and parse_condition(parse_row_key(k)[1])[1] == eps}
    if not rows:
      continue
    shapes = {np.shape(r) for r in rows.values()}
    if len(shapes) != 1:  # Deterministic and randomised rows cannot be paired draw by draw.
      continue
    worst = np.max(np.stack(list(rows.values())), axis=0)
    row = summary.row_summary(worst, ks, users=users, **kw)
    row["attacks"] = [parse_row_key(k)[1] for k in rows]
    row["unseen"] = summary.row_summary(
        worst, ks, users=unseen if users is None else unseen & users, **kw)
    out[name] = row
  return out
