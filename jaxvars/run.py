"""The two modes of a run: ``train_and_evaluate`` and ``evaluate`` (``jaxvars.main``).

``train_and_evaluate`` builds the experiment, computes item features with the frozen
backbone, trains the recommender (BPR), runs the defence stages, evaluates every system
under every condition and the ablations, and writes ``<workdir>/results.json`` (and
``artifacts.npz``). Every stage checkpoints under ``<workdir>/checkpoints/<stage>`` and is
resumed, or restored when finished. ``evaluate`` restores them and recomputes every
metric, which equals the training run's.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from jaxvars import (ablations, atomic, configuration, distributed, families, fs, provenance,
                     workdir as wd)
from jaxvars.errors import CheckpointError, ConfigError
from jaxvars.evaluate import evaluate_run
from jaxvars.evaluation.ranking import (candidate_matrix, candidate_scores, evaluate_scores,
                                        format_ranking_table)
from jaxvars.experiment import (Experiment, build, input_fingerprints,
                                make_consts, recommender_consts)
from jaxvars.metrics import MetricWriter
from jaxvars.progress import memory_gb
from jaxvars.overrides import ablation_variants
from jaxvars.training import defense, records, recommender as rec_training
from jaxvars.training.recommender import training_section  # noqa: F401  (jaxvars.run.training_section)

_OLD_LAYOUT = os.path.join(wd.CHECKPOINTS_DIR, "vbpr")  # jaxvars 0.1's recommender checkpoints.


def backbone_probe(exp: Experiment, consts: dict) -> dict | None:
  """Linear-probe accuracy of the item features on the item categories (H&M:
  ``product_type_name``; the settings of ``configs/pretrain.py``): what the backbone's
  features know, comparable across backbones. None where the data has no categories."""
  from jaxvars.evaluation.probe import linear_probe
  import numpy as np
  cats = np.asarray(exp.data.categories)
  _, counts = np.unique(cats[cats != ""], return_counts=True)
  if (counts >= 5).sum() < 2:  # linear_probe's min_per_class: fewer than 2 classes left.
    return None
  return linear_probe(np.asarray(consts["features"]), cats, seed=int(exp.config.seed))


def _check_layout(workdir: str) -> None:
  if (fs.isdir(fs.join(workdir, _OLD_LAYOUT))
      and not fs.isdir(wd.checkpoint_dir(workdir, rec_training.CHECKPOINT_DIR))):
    raise CheckpointError(
        f"{workdir} was written by jaxvars 0.1 (checkpoints/vbpr); its checkpoints cannot be "
        "restored by this version: run again with a fresh --workdir")


def _periodic_eval(exp: Experiment, consts: dict):
  config = exp.config
  if not config.eval.every_epochs:
    return None
  cands = candidate_matrix(exp.data.test_items, exp.data.eval_negatives)

  def on_epoch_end(params, epoch):
    if epoch % config.eval.every_epochs:
      return {}
    table = recommender_consts(exp, consts, params)["features"]  # DVBPR: its CNN's, now.
    scores = candidate_scores(exp.models.recommender, params, table, cands,
                              config.eval.batch_users)
    name = exp.models.recommender.name
    return {f"{name}/{k}": v for k, v in evaluate_scores(scores, tuple(config.eval.ks)).items()
            if k.endswith("@10")}

  return on_epoch_end


def _writable(workdir: str) -> None:
  try:
    fs.makedirs(workdir, exist_ok=True)
    check = fs.join(workdir, f".jaxvars_write_check.{distributed.process_index()}")
    with atomic.atomic_path(check, every_process=True) as tmp, \
        open(tmp, "w") as f:  # A local file, uploaded by atomic_path for a gs:// workdir.
      f.write("ok")
    fs.remove(check)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); choose a "
                      "directory you can write") from None


def expected_stages(config, workdir: str | None = None, inputs: dict | None = None, *,
                    recommender_workdir: str | None = None) -> dict:
  """{stage: {'fields': the config fields that shape it, 'inputs': what it trains on}} for
  the recommender and every defence stage, in training order
  (:mod:`jaxvars.training.records`). ``inputs``: the run's data, split and weights
  fingerprints (:func:`jaxvars.experiment.input_fingerprints`); a defence stage's also
  name the stage of ``workdir`` it starts from as its record holds it now."""
  names = defense.stage_names(config)
  base = inputs or {}
  out = {records.RECOMMENDER: {"fields": records.stage_fields(config, records.RECOMMENDER),
                               "inputs": dict(base)}}
  for k, name in enumerate(names):
    out[name] = {"fields": records.stage_fields(config, name, names[:k + 1]),
                 "inputs": records.stage_inputs(base, workdir or "", name, names[:k + 1],
                                                recommender_workdir)}
  return out


def check_stages(config, workdir: str, inputs: dict, *, pending=(), resume: str | None = None,
                 remove: bool = True, warn: bool = True) -> list[str]:
  """Stops (or, with ``config.resume='retrain_changed'``, retrains) the stages of ``workdir``,
  of its other recommenders (:mod:`jaxvars.families`) and of its ablation variants trained with other settings or on other inputs: every
  difference of every directory is found first (:func:`records.changes`), then the run
  stops with all of them, or the changed stages are removed.

  Args:
    inputs, pending: :func:`jaxvars.experiment.input_fingerprints` (``pending``: inputs
      not known yet, left out).
    resume: overrides ``config.resume`` (``'error'`` for ``--mode=evaluate``).
    remove: with ``retrain_changed``, remove the changed stages now; False (the check
      before the data and weights are loaded) only finds them, so that nothing is deleted
      before the run knows it can go on.
    warn: warn about records without inputs (once per run).

  Returns:
    The changed stages ('joint', or 'ablations/<variant>/joint').

  Raises:
    ConfigError: a stage differs and the resume mode is 'error'.
  """
  from jaxvars.overrides import ablation_variants, apply_overrides
  resume = config.resume if resume is None else resume
  changed, unrecorded = records.changes(workdir, expected_stages(config, workdir, inputs),
                                        pending=pending)
  rec_changed = records.RECOMMENDER in changed
  for name, overrides in ablation_variants(config).items():
    cfg = apply_overrides(config, overrides, where=f"config.ablation.variants.{name}")
    sub = wd.ablation_dir(workdir, name)
    expected = {k: v for k, v in expected_stages(cfg, sub, inputs,
                                                 recommender_workdir=workdir).items()
                if k != records.RECOMMENDER}
    more, old = records.changes(sub, expected, pending=pending, upstream_changed=rec_changed,
                                label=f"ablations/{name}/")
    changed.update(more)
    unrecorded += old
  for name, expected in families.expected_stages(config, inputs).items():
    more, old = records.changes(families.recommender_dir(workdir, name), expected,
                                pending=pending, label=f"{families.RECOMMENDERS_DIR}/{name}/")
    changed.update(more)
    unrecorded += old
  if warn:
    records.warn_unrecorded(workdir, unrecorded)
  return records.refuse_or_remove(workdir, changed, resume=resume, remove=remove,
                                  split_misfit=bool(changed) and resume == "error"
                                  and _split_misfit(config, workdir))


def _split_misfit(config, workdir: str) -> bool:
  """Whether the data pipeline refuses ``<workdir>/split.npz`` for ``config.data`` (made with
  other data settings or from other CSV files); False where it fits or is absent."""
  from jaxvars.data import pipeline
  from jaxvars.errors import DataError
  try:
    pipeline._check_stored_split(config.data, workdir,
                                 pipeline._split_source(pipeline._source_files(config.data)))
  except (ConfigError, DataError):
    return True
  return False


def _check_inputs(config, workdir: str, exp: Experiment, pending, *, resume=None) -> None:
  """The second look, once ``exp`` is built (data and weights loaded, the split made): the
  inputs that were pending, and the removal of the stages that retrain."""
  if pending or (resume or config.resume) == "retrain_changed":
    check_stages(config, workdir, exp.inputs, resume=resume, warn=False)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage and the evaluation, writes ``<workdir>/results.json``; returns it.

  Each stage resumes from (or, finished, restores) its checkpoint in ``workdir``; a stage
  trained there with other settings stops the run before any work (see
  :func:`check_stages`). Scalars go to ``<workdir>/metrics`` as they are computed.

  Raises:
    ConfigError, DataError: bad config value or data file (named in the message), or a
      workdir that cannot be written.
    NonFiniteLossError: a NaN/inf loss; checkpoints already saved stay valid and no
      results file is written (an ablation variant's is recorded instead: jaxvars/ablations.py).

  With ablation variants, the main run's results are written (marked ``'incomplete'``)
  before the ablation study starts, so an error or a kill there loses none of them.
  """
  t_start = time.perf_counter()
  workdir = fs.fspath(workdir)  # A str, pathlib.Path or etils.epath.Path (gs://...).
  _writable(workdir)
  _check_layout(workdir)
  configuration.validate(config)
  inputs, pending = input_fingerprints(config, workdir)
  check_stages(config, workdir, inputs, pending=pending, remove=False)  # Before any work.
  exp = build(config, workdir)
  _check_inputs(config, workdir, exp, pending)
  wd.write_config(workdir, config.to_dict())
  logging.info("data: %s", json.dumps(exp.data.summary()))
  logging.info("mesh: %d %s device(s)", exp.mesh.size, jax.devices()[0].platform)
  writer = MetricWriter(workdir)
  try:
    t = time.perf_counter()
    consts = make_consts(exp)
    exp.timing["features_s"] = time.perf_counter() - t
    rec_state, rec_history, n_steps, rec_seconds = rec_training.train_recommender(
        exp, consts, workdir, on_epoch_end=_periodic_eval(exp, consts), writer=writer)
    exp.timing["recommender_train_s"] = rec_seconds
    exp.timing["recommender_train_steps"] = n_steps
    params = dict(exp.params, recommender=rec_state.params)
    rec_consts = recommender_consts(exp, consts, rec_state.params)  # DVBPR: through its CNN.
    params, stage_history, stage_seconds = defense.train_defense(exp, rec_consts, params,
                                                                 workdir, writer=writer)
    exp.timing.update({f"stage_{k}_s": v for k, v in stage_seconds.items()})
    results, artifacts = evaluate_run(exp, params, rec_consts, cached_time=True)
    if artifacts:
      wd.write_artifacts(workdir, artifacts)
    results["backbone"]["linear_probe"] = backbone_probe(exp, consts)
    results["training"] = training_section(config, rec_history, rec_state.step, stage_history,
                                           exp.models.recommender)
    if families.others(config):
      results["recommenders"] = families.evaluate(
          exp, consts, params, workdir, (results, wd.ranks_of(artifacts)), train=True)
    if ablation_variants(config):
      _write_interim(results, config, workdir, time.perf_counter() - t_start)
      results["ablations"] = ablations.run_ablations(exp, rec_consts, rec_state.params, workdir,
                                                     train=True, main_ranks=wd.ranks_of(artifacts))
    results["timing"]["total_s"] = time.perf_counter() - t_start
    results["timing"]["peak_rss_gb"] = memory_gb()[1]
    results["config"] = config.to_dict()
    results["provenance"] = provenance.describe()
    write_eval_scalars(writer, results)
  finally:
    writer.close()
  finish(results, workdir)
  return results


INCOMPLETE_KEY = "incomplete"


def _write_interim(results: dict, config, workdir: str, seconds: float) -> None:
  """Writes the main run's results before the ablation study starts (hours on a CPU), so a
  crash or a kill there loses none of them. The file says so under ``'incomplete'``; the
  finished run's results.json replaces it."""
  interim = dict(results, timing=dict(results["timing"], total_s=seconds),
                 config=config.to_dict(), provenance=provenance.describe())
  interim[INCOMPLETE_KEY] = ("the ablation study had not finished when this file was written; "
                             "run the same command again to resume it")
  path = wd.write_results(workdir, interim)
  logging.info("main run's results written to %s; the ablation study starts", path)


def write_eval_scalars(writer, results: dict) -> None:
  """Ranking and detection numbers of a finished evaluation, for TensorBoard (step 0)."""
  for key, row in results.get("ranking", {}).items():
    writer.scalars(f"eval/{key}", 0, row)
  for cond, row in results.get("detection", {}).items():
    writer.scalars(f"eval/detection/{cond}", 0, row)
  for cond, row in results.get("attack", {}).items():
    if row.get("time_s"):
      writer.scalars(f"attack/{cond}", 0, {"images_per_s": results["data"]["items"] / row["time_s"],
                                          "linf_255": row["linf_255"]})


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores every stage's latest checkpoint in ``workdir`` and recomputes all metrics.

  They equal those of the training run (same split from ``split.npz``, same
  parameters, same seeded attacks). ``results.json`` is rewritten with the
  recomputed tables; its ``training`` and ``config`` sections are kept (or rebuilt from
  the stages' records), its ``timing`` keeps the training run's keys and gains the
  evaluation's as ``evaluate_*``.

  Raises:
    CheckpointError: no checkpoint in ``workdir``, or one of another model shape.
    ConfigError: stages trained with other settings than ``config``'s, or a workdir that
      cannot be written.
    DataError: ``<workdir>/results.json`` is damaged (named before any work).
  """
  from jaxvars.report.writer import read_results
  t_start = time.perf_counter()
  workdir = fs.fspath(workdir)
  if not fs.isdir(wd.checkpoints_root(workdir)):
    raise CheckpointError(f"{workdir}/checkpoints does not exist; run with --mode=train first")
  _writable(workdir)
  _check_layout(workdir)
  previous = read_results(wd.results_path(workdir))  # Damaged: named before any work.
  configuration.validate(config)
  inputs, pending = input_fingerprints(config, workdir)
  check_stages(config, workdir, inputs, pending=pending, resume="error")
  exp = build(config, workdir)
  _check_inputs(config, workdir, exp, pending, resume="error")
  rec_state, backbone_vars, step = rec_training.restore(exp, workdir)
  params = defense.restore_stages(exp, dict(exp.params, recommender=rec_state.params), workdir)
  exp.backbone_vars = backbone_vars
  t = time.perf_counter()
  consts = make_consts(exp)
  exp.timing["features_s"] = time.perf_counter() - t
  rec_consts = recommender_consts(exp, consts, params["recommender"])  # DVBPR: its CNN.
  fresh, artifacts = evaluate_run(exp, params, rec_consts)
  if artifacts:
    wd.write_artifacts(workdir, artifacts)
  fresh["backbone"]["linear_probe"] = backbone_probe(exp, consts)
  if families.others(config):
    fresh["recommenders"] = families.evaluate(
        exp, consts, params, workdir, (fresh, wd.ranks_of(artifacts)), train=False)
  if ablation_variants(config):
    fresh["ablations"] = ablations.run_ablations(exp, rec_consts, params["recommender"], workdir,
                                                 train=False, main_ranks=wd.ranks_of(artifacts))
  fresh["timing"]["total_s"] = time.perf_counter() - t_start
  fresh["timing"]["peak_rss_gb"] = memory_gb()[1]
  path = wd.results_path(workdir)
  results = previous or {}
  if previous is not None:
    # An interim file (a run stopped during its ablation study) has no ablations to compare.
    same = all(without_timing(results.get(k)) == without_timing(fresh.get(k))
               for k in ("ranking", "detection", "ablations", "recommenders") if k in results)
    results.pop(INCOMPLETE_KEY, None)
    if same:
      logging.info("restored checkpoints reproduce the training run's metrics exactly")
    else:
      logging.warning("restored checkpoints give metrics that differ from %s", path)
  timing = dict(results.get("timing", {}))
  timing.update({f"evaluate_{k}": v for k, v in fresh.pop("timing").items()})
  results.update(fresh)
  results["timing"] = timing
  if "training" not in results:
    results["training"] = training_section(config, *_recorded_history(exp, workdir),
                                           exp.models.recommender)
  results["restored_recommender_step"] = int(step)
  results.setdefault("config", config.to_dict())
  results["evaluate_provenance"] = provenance.describe()
  finish(results, workdir)
  return results


def _recorded_history(exp: Experiment, workdir: str):
  rec = records.load(wd.checkpoint_dir(workdir, records.RECOMMENDER)) or {}
  stages = {name: (records.load(wd.checkpoint_dir(workdir, name)) or {}).get(
      "history", []) for name in defense.stage_names(exp.config)}
  history = rec.get("history", [])
  return history, exp.rec_steps_per_epoch * len(history), stages


def without_timing(section):
  """A results section without wall-clock fields and training-only records (for comparing a
  training run's results with an evaluate-only run's)."""
  if isinstance(section, dict):
    return {k: without_timing(v) for k, v in section.items()
            if k not in ("timing", "time_s", "cached", "stages", "adopted_stages")}
  return section


def finish(results: dict, workdir: str) -> None:
  """Writes results.json and prints the ranking and detection tables (process 0)."""
  path = wd.write_results(workdir, results)
  if not distributed.is_main():  # Process 0 prints for all.
    return
  print("\nranking\n" + format_ranking_table(results["ranking"]))
  if results.get("detection"):
    print("\ndetection\n" + format_ranking_table(
        {k: {m: v for m, v in row.items() if m != "items"}
         for k, row in results["detection"].items()}))
  print(f"\nresults written to {path}")
