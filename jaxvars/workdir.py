"""Every path of a run's directory (``--workdir``), and the writers of its results.

::

  <workdir>/
    results.json        every table of the run (docs/results-json.md)
    artifacts.npz       per-user ranks, detector scores, sample images (figures, ablations)
    config.json         the config the run was started with
    split.npz           the leave-one-out split and evaluation negatives (data pipeline)
    checkpoints/<stage> Orbax checkpoints and jaxvars_stage.json of each trained stage
    attacks/<key>.npy   attacked photos (+ .json: fingerprint, checksum, stats)
    ablations/<name>/   an ablation variant's own workdir (its defence stages, results.json)
    metrics/            TensorBoard event files
    .jaxvars.lock       held while a run, an evaluation or a report uses the workdir

A workdir may be a local path or any path ``etils.epath`` opens (``gs://bucket/run``), given
as a ``str``, a ``pathlib.Path`` or an ``epath.Path``. Every function here returns the path
as a string (:func:`jaxvars.fs.join`: ``'gs://bucket/run/results.json'``); reads and writes
go through :mod:`jaxvars.fs` and :mod:`jaxvars.atomic`, which keep ``os`` for local paths and
use ``epath`` for the others.

This module only names paths and writes files atomically (:mod:`jaxvars.atomic`); it imports
nothing else of jaxvars but :mod:`jaxvars.fs`, so every layer may use it. The writers of a
run's outputs are :func:`write_results`, :func:`write_artifacts` and :func:`write_config`
(and :func:`jaxvars.report.writer.write_report`), the places to gate for multi-process runs.
"""

from __future__ import annotations

import numpy as np

from jaxvars import atomic, fs
from jaxvars.fs import PathLike

RESULTS_FILE = "results.json"
ARTIFACTS_FILE = "artifacts.npz"  # Per-user ranks, detector scores, embeddings, sample images.
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.npz"
CHECKPOINTS_DIR = "checkpoints"
ATTACKS_DIR = "attacks"
ABLATIONS_DIR = "ablations"
METRICS_DIR = "metrics"
LOCK_FILE = ".jaxvars.lock"
RANKS_PREFIX = "ranks/"  # artifacts.npz: 'ranks/<row key>' int16 [U] or [K, U] (sampled).
FULL_RANKS_PREFIX = "full_ranks/"  # ... and int32 ranks of the full-ranking protocol.


def results_path(workdir: PathLike) -> str:
  return fs.join(workdir, RESULTS_FILE)


def artifacts_path(workdir: PathLike) -> str:
  return fs.join(workdir, ARTIFACTS_FILE)


def config_path(workdir: PathLike) -> str:
  return fs.join(workdir, CONFIG_FILE)


def split_path(workdir: PathLike) -> str:
  return fs.join(workdir, SPLIT_FILE)


def checkpoint_dir(workdir: PathLike, stage: str) -> str:
  """``<workdir>/checkpoints/<stage>``: a stage's Orbax checkpoints and its record."""
  return fs.join(workdir, CHECKPOINTS_DIR, stage)


def checkpoints_root(workdir: PathLike) -> str:
  return fs.join(workdir, CHECKPOINTS_DIR)


def attacks_dir(workdir: PathLike) -> str:
  """``<workdir>/attacks``: the attack cache (:mod:`jaxvars.attacks.catalogue`)."""
  return fs.join(workdir, ATTACKS_DIR)


def ablation_dir(workdir: PathLike, name: str) -> str:
  """``<workdir>/ablations/<name>``: the workdir of ablation variant ``name``."""
  return fs.join(workdir, ABLATIONS_DIR, name)


def metrics_dir(workdir: PathLike) -> str:
  return fs.join(workdir, METRICS_DIR)


def lock_path(workdir: PathLike) -> str:
  return fs.join(workdir, LOCK_FILE)


def write_results(workdir: PathLike, results: dict) -> str:
  """Writes ``<workdir>/results.json`` atomically; returns its path."""
  path = results_path(workdir)
  atomic.write_json(path, results)
  return path


def write_artifacts(workdir: PathLike, artifacts: dict) -> str:
  """Writes ``<workdir>/artifacts.npz`` (plain arrays) atomically; returns its path."""
  path = artifacts_path(workdir)
  atomic.write_npz(path, artifacts)
  return path


def ranks_of(artifacts: dict, prefix: str = RANKS_PREFIX) -> dict[str, np.ndarray]:
  """{row key: ranks} of the arrays of an artifacts dict (or of a loaded artifacts.npz)."""
  keys = artifacts.files if hasattr(artifacts, "files") else list(artifacts)
  return {k.removeprefix(prefix): np.asarray(artifacts[k]) for k in keys if k.startswith(prefix)}


def write_config(workdir: PathLike, config: dict) -> str:
  """Writes ``<workdir>/config.json`` (the run's config as a dict) atomically; returns its
  path."""
  path = config_path(workdir)
  atomic.write_json(path, config)
  return path
