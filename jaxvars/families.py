"""Several recommenders in one run: the paper's Tables 2-3 (a recommender family x
{undefended, AMR, OURS, OURS-rand} x {clean, FGSM, PGD, worst case}).

``config.recommenders`` names the recommenders evaluated side by side (registered names,
e.g. ``('vbpr', 'amr', 'bprmf')``). The defence stages are trained once, against
``config.recommender.name`` (the paper trains them against VBPR), and deployed unchanged in
front of every recommender. Each other recommender is trained (or fitted, or restored)
under ``<workdir>/recommenders/<name>/`` with ``config.recommender``'s fields and the run's
seed, data and item features (its checkpoint is recorded and resumed as the main
recommender's), then evaluated on clean photos and under every transfer attack of
``config.attack.methods`` x ``eval_eps``, **crafted against that recommender** (white-box to
it, as in the paper), with the systems of :data:`TABLE_SYSTEMS` that the run evaluates.
The adaptive, targeted, detection and ablation sections stay the defence recommender's.

results.json's ``recommenders`` section holds the rows ``<recommender>/<system>/<condition>``
(``system`` a registered system name: 'undefended', 'defended', 'defended_rand'), the worst
case of each ``<recommender>/<system>`` over the table's attacks at the report's eps, paired
comparisons with the defence recommender's rows, and each other recommender's own training,
attack and timing records (docs/results-json.md).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from jaxvars import distributed, fs, workdir as wd
from jaxvars.conditions import CLEAN
from jaxvars.defenses import UNDEFENDED, row_name
from jaxvars.evaluate import evaluate_run
from jaxvars.evaluation import feature_attack, summary, tables
from jaxvars.experiment import recommender_consts
from jaxvars.overrides import without_ablations
from jaxvars.recommenders import build_recommender

RECOMMENDERS_DIR = "recommenders"  # <workdir>/recommenders/<name>/: another recommender's.
# The systems of the paper's Tables 2-3 (besides the recommender itself: AMR is a row of its
# own recommender): OURS and OURS-rand.
TABLE_SYSTEMS = (UNDEFENDED, "defended", "defended_rand")
FEATURE_ATTACK_SALT = 35  # fold_in(key(config.seed), this): the feature attack's negatives.


def names(config) -> tuple[str, ...]:
  """The recommenders of the run, the defence recommender (``config.recommender.name``)
  first, then the others of ``config.recommenders`` in their order (each once)."""
  main = str(config.recommender.name)
  return (main,) + tuple(dict.fromkeys(n for n in config.get("recommenders", ()) if n != main))


def others(config) -> tuple[str, ...]:
  """The recommenders of :func:`names` other than the defence recommender."""
  return names(config)[1:]


def recommender_dir(workdir: str, name: str) -> str:
  """``<workdir>/recommenders/<name>``: another recommender's own workdir."""
  return fs.join(workdir, RECOMMENDERS_DIR, name)


def config_for(config, name: str):
  """The config of recommender ``name``'s part of the run: ``config`` with
  ``recommender.name = name``, without ablation variants, adaptive or targeted attacks, and
  with only the systems of :data:`TABLE_SYSTEMS`."""
  import ml_collections
  cfg = without_ablations(ml_collections.ConfigDict(config.to_dict()))
  cfg.recommender.name = name
  if "adaptive" in cfg.attack:
    cfg.attack.adaptive.eps = ()
  if "targeted" in cfg:
    cfg.targeted.num_targets = 0
  cfg.systems.evaluate = tuple(s for s in cfg.systems.evaluate if s in TABLE_SYSTEMS)
  return cfg


def experiment_for(exp, name: str, workdir: str):
  """``exp`` (:class:`jaxvars.experiment.Experiment`) rebuilt around recommender ``name``:
  its module, its initial parameters (drawn from the key the run's recommender is drawn
  from, so it starts where a run of ``recommender.name=name`` starts) and its workdir. A
  recommender without a visual term (BPR-MF), which no photo can move, is evaluated on
  clean photos only, undefended."""
  cfg = config_for(exp.config, name)
  feature_dim = int(exp.models.backbone.feature_dim)
  rec = build_recommender(cfg.recommender, num_users=exp.data.num_users,
                          num_items=exp.data.num_items, feature_dim=feature_dim)
  if not rec.uses_features:  # No photo can move it: clean photos, undefended only.
    cfg.systems.evaluate = tuple(s for s in cfg.systems.evaluate if s == UNDEFENDED)
    cfg.attack.eval_eps = ()
  k_rec = jax.random.split(jax.random.key(cfg.seed), 4)[1]  # As jaxvars.experiment.build.
  params = dict(exp.params, recommender=distributed.put(
      rec.init(k_rec, feature_dim), jax.tree.leaves(exp.params)[0].sharding))
  return dataclasses.replace(exp, config=cfg, models=dataclasses.replace(exp.models, recommender=rec),
                             params=params, workdir=recommender_dir(workdir, name), timing={})


def expected_stages(config, inputs: dict) -> dict:
  """{name: {'recommender': {'fields', 'inputs'}}} of each other recommender (the records
  its checkpoint must match, :mod:`jaxvars.training.records`)."""
  from jaxvars.training import records
  return {name: {records.RECOMMENDER: {
      "fields": records.stage_fields(config_for(config, name), records.RECOMMENDER),
      "inputs": dict(inputs)}} for name in others(config)}


def run_others(exp, consts: dict, params: dict, workdir: str, *, train: bool) -> dict:
  """Trains (``train``; resuming) or restores each other recommender and evaluates it with
  the run's trained defence (``params`` without 'recommender': the denoiser, detector)
  in front.

  Returns:
    {name: (results: :func:`jaxvars.evaluate.evaluate_run`'s sections plus 'training',
    per-user ranks {row: int [U] or [K, U]})}.

  Raises:
    CheckpointError: ``train=False`` and no checkpoint of that recommender.
  """
  from jaxvars.training import recommender as rec_training
  out = {}
  for name in others(exp.config):
    t = time.perf_counter()
    sub = recommender_dir(workdir, name)
    fs.makedirs(sub, exist_ok=True)
    ex = experiment_for(exp, name, workdir)
    rec = ex.models.recommender
    logging.info("recommender %s (%s): %s, then evaluated behind the defence trained against "
                 "%s", name, rec.label, "trained" if train else "restored",
                 exp.models.recommender.label)
    if train:
      state, history, n_steps, seconds = rec_training.train_recommender(ex, consts, sub)
      ex.timing["recommender_train_s"] = seconds
      steps = state.step
    else:
      state, _, steps = rec_training.restore(ex, sub)
      history = rec_training_history(sub)
    p = dict(params, recommender=state.params)
    rec_consts = recommender_consts(ex, consts, state.params)  # DVBPR: through its own CNN.
    res, artifacts = evaluate_run(ex, p, rec_consts, cache_dir=wd.attacks_dir(sub), detect=False,
                                  fidelity=False, mostpop=False, cached_time=train)
    res["training"] = rec_training.training_section(ex.config, history, steps, {}, rec)["recommender"]
    res["timing"]["total_s"] = time.perf_counter() - t
    if artifacts:
      wd.write_artifacts(sub, artifacts)
    wd.write_results(sub, dict(res, config=ex.config.to_dict()))
    out[name] = (res, wd.ranks_of(artifacts), feature_ranks(ex.config, rec, state.params,
                                                            rec_consts, exp.data))
  return out


def feature_ranks(config, recommender, rec_params, consts: dict, data):
  """Per-user ranks (int64 [U]) under Tang et al.'s feature-space attack
  (:mod:`jaxvars.evaluation.feature_attack`) at ``config.recommender.adv_eps`` (AMR's
  training eps), or None for a recommender without a visual term."""
  if not recommender.uses_features:
    return None
  key = jax.random.fold_in(jax.random.key(int(config.seed)), FEATURE_ATTACK_SALT)
  return feature_attack.ranks(recommender, rec_params, consts["features"], data,
                              eps=float(config.recommender.adv_eps), key=key,
                              batch_users=int(config.eval.batch_users))


def evaluate(exp, consts: dict, params: dict, workdir: str, main: tuple[dict, dict], *,
             train: bool) -> dict:
  """results.json's ``recommenders`` section of a run whose defence recommender's
  evaluation is ``main`` ((results, per-user ranks)): :func:`run_others`, the feature-space
  attack on every recommender with a visual term, then :func:`section`."""
  out = run_others(exp, consts, params, workdir, train=train)
  feature = {n: fr for n, (_, _, fr) in out.items() if fr is not None}
  mine = feature_ranks(exp.config, exp.models.recommender, params["recommender"],
                       recommender_consts(exp, consts, params["recommender"]), exp.data)
  if mine is not None:
    feature = {str(exp.config.recommender.name): mine, **feature}
  return section(exp.config, main, {n: (r, k) for n, (r, k, _) in out.items()},
                 feature=feature)


def rec_training_history(sub: str) -> list:
  """The recorded per-epoch history of the recommender checkpointed under ``sub``."""
  from jaxvars.training import records
  return (records.load(wd.checkpoint_dir(sub, records.RECOMMENDER)) or {}).get("history", [])


def _table_rows(results: dict, rec_name: str) -> dict:
  """{(system, condition): row key of ``results['ranking']``} of the table's systems under
  clean and the transfer conditions."""
  conds = [c for c in results.get("conditions", []) if c["kind"] in ("clean", "transfer")]
  out = {}
  for c in conds:
    for system in TABLE_SYSTEMS:
      key = f"{row_name(system, rec_name)}/{c['name']}"
      if key in results.get("ranking", {}):
        out[(system, c["name"])] = key
  return out


def section(config, main: tuple[dict, dict], others_out: dict,
            feature: dict | None = None) -> dict:
  """results.json's ``recommenders`` section.

  Args:
    main: (the main run's results, its per-user ranks {row: ranks}).
    others_out: {name: (results, per-user ranks)} of each other recommender
      (:func:`run_others`).
    feature: {name: per-user ranks int [U] under the feature-space attack} (:func:`evaluate`).

  Returns:
    {'defense_recommender', 'names', 'labels', 'rows': {'<rec>/<system>/<condition>': the
    row of that recommender's ranking}, 'rows_full' (the full-ranking protocol's),
    'robust': {'<rec>/<system>': the worst case over the table's attacks at the report's
    eps}, 'comparisons': {'<row a> - <row b>': {metric: {'diff', 'ci95', 'effect'}}, paired
    over users: each defended row against its recommender undefended, and each other
    recommender undefended against the defence recommender undefended and defended}, 'runs':
    {other name: {'training', 'attack', 'timing', 'conditions'}}, 'feature_attack': {'eps',
    'rows': {'<rec>': the row under the feature-space attack}, 'comparisons': {'<rec> -
    <rec>/undefended/clean': the drop; 'amr - <defence rec>': the paired difference under
    the attack}} (absent without a recommender with a visual term)}.
  """
  e = config.eval
  kw = dict(resamples=int(e.bootstrap_resamples), seed=int(e.bootstrap_seed))
  ks = tuple(e.ks)
  main_name = str(config.recommender.name)
  every = {main_name: main, **{n: v for n, v in others_out.items()}}
  rows, rows_full, ranks, labels, robust = {}, {}, {}, {}, {}
  eps = float(config.ablation.get("eps", 8.0))
  for name, (res, rk) in every.items():
    labels[name] = next((s["label"] for s in res.get("systems", {}).values()
                         if s.get("system") == UNDEFENDED), name.upper())
    picked = _table_rows(res, name)
    for (system, cond), key in picked.items():
      k = f"{name}/{system}/{cond}"
      rows[k] = res["ranking"][key]
      if key in res.get("ranking_full", {}):
        rows_full[k] = res["ranking_full"][key]
      if key in rk:
        ranks[k] = rk[key]
    eps_of = {c["name"]: c.get("eps") for c in res.get("conditions", [])
              if c["kind"] == "transfer"}
    for system in TABLE_SYSTEMS:
      attacked = {k: ranks[f"{name}/{system}/{c}"] for (s, c), k in picked.items()
                  if s == system and eps_of.get(c) == eps and f"{name}/{system}/{c}" in ranks}
      shapes = {np.shape(r) for r in attacked.values()}
      if not attacked or len(shapes) != 1:
        continue
      worst = np.max(np.stack(list(attacked.values())), axis=0)
      robust[f"{name}/{system}"] = dict(summary.row_summary(worst, ks, **kw),
                                        attacks=[picked[(system, c)].split("/", 1)[1]
                                                 for (s, c) in picked if s == system
                                                 and eps_of.get(c) == eps])
  comparisons = {}
  conds = list(dict.fromkeys(k.split("/", 2)[2] for k in rows))
  for cond in conds:
    pairs = [(f"{n}/{s}/{cond}", f"{n}/{UNDEFENDED}/{cond}")  # The defence in front of n.
             for n in every for s in TABLE_SYSTEMS if s != UNDEFENDED]
    pairs += [(f"{n}/{UNDEFENDED}/{cond}", f"{main_name}/{s}/{cond}")  # n against VBPR, OURS.
              for n in others_out for s in (UNDEFENDED, "defended")]
    for a, b in pairs:
      if a in ranks and b in ranks and np.shape(ranks[a])[-1] == np.shape(ranks[b])[-1]:
        comparisons[f"{a} - {b}"] = summary.comparison(ranks[a], ranks[b], ks, **kw)
  runs = {n: {"training": res.get("training"), "attack": res.get("attack", {}),
              "timing": res.get("timing", {}), "conditions": res.get("conditions", [])}
          for n, (res, _) in others_out.items()}
  out = {"defense_recommender": main_name, "names": list(every), "labels": labels,
         "eps": eps, "rows": rows, "rows_full": rows_full, "robust": robust,
         "comparisons": comparisons, "runs": runs}
  if feature:
    fa = {"eps": float(config.recommender.adv_eps),
          "threat_model": "white-box, feature space: every item's feature moved by Tang et "
                          "al.'s fast-gradient perturbation of the training BPR loss",
          "rows": {n: summary.row_summary(r, ks, **kw) for n, r in feature.items()},
          "comparisons": {}}
    for n, r in feature.items():
      clean = f"{n}/{UNDEFENDED}/{CLEAN}"
      if clean in ranks:
        fa["comparisons"][f"{n} - {clean}"] = summary.comparison(r, ranks[clean], ks, **kw)
    for n in feature:
      if n != main_name and main_name in feature:
        fa["comparisons"][f"{n} - {main_name}"] = summary.comparison(
            feature[n], feature[main_name], ks, **kw)
    out["feature_attack"] = fa
  return out
