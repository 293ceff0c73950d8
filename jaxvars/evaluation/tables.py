"""From per-user ranks of every row to the tables of results.json: the rows with 95%
bootstrap intervals by user group, the paired comparisons, and the worst case per system.

A row is ``'<system row name>/<condition>'`` (:func:`jaxvars.conditions.row_key`). Rows of
an item-subset attack (``partial``) are scored on the users whose held-out item it attacked
(``attacked``); everything else on all users, and split into the users whose held-out item
the defence never trained on (``unseen``) and the others.
"""

from __future__ import annotations

import numpy as np

from jaxvars.conditions import CLEAN, row_key
from jaxvars.defenses import SYSTEMS, row_name
from jaxvars.evaluation import summary
from jaxvars.evaluation.plan import FLOOR, GATE_SUFFIX


def systems_table(systems, recommender, config) -> dict:
  """The ``systems`` section of results.json: {row name: {'system', 'label', 'description',
  'settings', 'randomized'}}, and for one setting of a swept system (``jpeg_q90``: a tuple
  ``config.systems.jpeg_quality``) also ``'sweep': {'of': 'jpeg', 'field': 'jpeg_quality',
  'value': 90}``."""
  out = {}
  for name in systems:
    s = SYSTEMS.get(name)
    out[row_name(name, recommender.name)] = entry = {
        "system": name, "label": s.label or recommender.label, "description": s.description,
        "settings": s.settings(config), "randomized": s.randomized}
    base = SYSTEMS.base_of(name)
    if base != name:
      field = SYSTEMS.get(base).sweep.field
      entry["sweep"] = {"of": base, "field": field, "value": entry["settings"][field]}
  return out


def _kw(config) -> dict:
  e = config.eval
  return dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))


def _users(key_or_keys, partial: set, attacked: np.ndarray | None, group: np.ndarray | None):
  """The user mask a row (or a pair of rows) is scored on: ``group`` (None = all users),
  narrowed to the ``attacked`` users where a row is an item-subset attack's (``partial``)."""
  keys = (key_or_keys,) if isinstance(key_or_keys, str) else key_or_keys
  if attacked is None or not any(k in partial for k in keys):
    return group
  return attacked if group is None else group & attacked


def ranking_tables(ranks: dict, config, unseen: np.ndarray, *, partial: set = frozenset(),
                   attacked: np.ndarray | None = None, metrics=None,
                   sections=("ranking", "ranking_unseen", "ranking_seen")) -> dict:
  """{'ranking', 'ranking_unseen', 'ranking_seen'} (+ 'ranking_attacked', every row on the
  ``attacked`` users, where given): one row summary (:func:`summary.row_summary`) per rank
  array [U] or [K, U]. Rows in ``partial`` are scored on the ``attacked`` users only.

  ``metrics``: the rank metrics (:mod:`jaxvars.evaluation.rank_metrics`; None: the sampled
  protocol's HR and NDCG). ``sections``: the names of the all / unseen / seen sections
  (None leaves one out), e.g. ``('ranking_full', None, None)``.
  """
  ks, kw = tuple(config.eval.ks), _kw(config)
  if metrics is not None:
    kw["metrics"] = tuple(metrics)
  groups = [(s, g) for s, g in zip(sections, (None, unseen, ~unseen)) if s]
  out = {s: {} for s, _ in groups}
  if attacked is not None and sections[0] == "ranking":
    out["ranking_attacked"] = {}
  for key, r in ranks.items():
    for section, group in groups:
      out[section][key] = summary.row_summary(
          r, ks, users=_users(key, partial, attacked, group), **kw)
    if "ranking_attacked" in out:
      out["ranking_attacked"][key] = summary.row_summary(r, ks, users=attacked, **kw)
  return out


def comparison_pairs(rows: dict, names: list[str], conditions: list[str],
                     longer: dict[str, str]) -> tuple[list, set]:
  """The paired comparisons of results.json, in order: every system under every attack vs
  itself on clean photos; each gated row vs the same system ungated; each sanity check vs
  the attack it doubles (``longer``: {condition: condition it is compared with}); every
  other system vs the first (undefended) one under each condition. Only pairs whose rows
  both exist in ``rows``.

  Returns:
    (pairs [(row a, row b)], the set of more-steps pairs).
  """
  pairs, steps = [], set()
  for s in names:
    pairs += [(row_key(s, c), row_key(s, CLEAN)) for c in conditions if c not in (CLEAN, FLOOR)]
    pairs += [(row_key(s + GATE_SUFFIX, c), row_key(s, c)) for c in conditions]
    more = [(row_key(s, c), row_key(s, longer[c])) for c in conditions if c in longer]
    pairs += more
    steps.update(more)
  for s in names[1:]:
    pairs += [(row_key(s, c), row_key(names[0], c)) for c in conditions]
  return [(a, b) for a, b in pairs if a in rows and b in rows], steps


def comparisons(ranks: dict, pairs: list, config, unseen: np.ndarray, *,
                partial: set = frozenset(), attacked: np.ndarray | None = None,
                longer: set = frozenset(), metrics=None) -> dict:
  """Paired differences (:func:`summary.comparison`) of each pair of rows, for all users
  and the unseen users; a pair with an item-subset attack's row (``partial``) is paired on
  the ``attacked`` users. The more-steps sanity pairs (``longer``) also compare the held-out
  item's mean rank (``'mean_rank'``, :func:`summary.rank_comparison`).
  {'<a> - <b>': {'all': {metric: {'diff', 'ci95', 'effect'}}, 'unseen': ...}}."""
  ks, kw = tuple(config.eval.ks), _kw(config)
  extra = {} if metrics is None else {"rank_metrics": tuple(metrics)}
  out = {}
  for a, b in pairs:
    out[f"{a} - {b}"] = {}
    for group, among in (("all", None), ("unseen", unseen)):
      users = _users((a, b), partial, attacked, among)
      out[f"{a} - {b}"][group] = summary.comparison(ranks[a], ranks[b], ks, users=users,
                                                    **kw, **extra)
      if (a, b) in longer:  # Carlini's more-steps check: also every user's rank (report).
        out[f"{a} - {b}"][group]["mean_rank"] = summary.rank_comparison(
            ranks[a], ranks[b], users=users, **kw)
  return out


def worst_case(ranks: dict, rows: dict, eps_of: dict, names: list[str], config,
               unseen: np.ndarray, *, attacked: np.ndarray | None = None) -> dict:
  """The worst case per system (AutoAttack-style robust accuracy): a user counts as a hit
  only if the held-out item stays in the top N under every attack at the report's eps
  (``config.ablation.eps``; rejected uploads, the gated rows, not counted as attacks of the
  ungated system), over the ``attacked`` users (bool [U]: those whose held-out item every
  attack perturbed; None = all users).

  Args:
    rows: {row key: (row system name, condition)}. eps_of: {condition: eps or None}.

  Returns:
    {row name: {metrics, 'ci95', 'users', 'attacks', 'unseen': {...}}}.
  """
  ks, kw = tuple(config.eval.ks), _kw(config)
  eps = float(config.ablation.get("eps", 8.0))
  out = {}
  for name in names:
    picked = {k: r for k, r in ranks.items() if rows[k][0] == name
              and eps_of.get(rows[k][1]) == eps}
    if not picked:
      continue
    shapes = {np.shape(r) for r in picked.values()}
    if len(shapes) != 1:  # Deterministic and randomised rows cannot be paired draw by draw.
      continue
    worst = np.max(np.stack(list(picked.values())), axis=0)
    row = summary.row_summary(worst, ks, users=attacked, **kw)
    row["attacks"] = [rows[k][1] for k in picked]
    row["unseen"] = summary.row_summary(
        worst, ks, users=unseen if attacked is None else unseen & attacked, **kw)
    out[name] = row
  return out
