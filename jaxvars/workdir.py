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

This module only names paths and writes files atomically (:mod:`jaxvars.atomic`); it imports
nothing else of jaxvars, so every layer may use it.
"""

from __future__ import annotations

import os

import numpy as np

from jaxvars import atomic

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


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def artifacts_path(workdir: str) -> str:
  return os.path.join(workdir, ARTIFACTS_FILE)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def split_path(workdir: str) -> str:
  return os.path.join(workdir, SPLIT_FILE)


def checkpoint_dir(workdir: str, stage: str) -> str:
  """``<workdir>/checkpoints/<stage>``: a stage's Orbax checkpoints and its record."""
  return os.path.join(workdir, CHECKPOINTS_DIR, stage)


def checkpoints_root(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def attacks_dir(workdir: str) -> str:
  """``<workdir>/attacks``: the attack cache (:mod:`jaxvars.attacks.catalogue`)."""
  return os.path.join(workdir, ATTACKS_DIR)


def ablation_dir(workdir: str, name: str) -> str:
  """``<workdir>/ablations/<name>``: the workdir of ablation variant ``name``."""
  return os.path.join(workdir, ABLATIONS_DIR, name)


def metrics_dir(workdir: str) -> str:
  return os.path.join(workdir, METRICS_DIR)


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def write_results(workdir: str, results: dict) -> str:
  """Writes ``<workdir>/results.json`` atomically; returns its path."""
  path = results_path(workdir)
  atomic.write_json(path, results)
  return path


def write_artifacts(workdir: str, artifacts: dict) -> str:
  """Writes ``<workdir>/artifacts.npz`` (plain arrays) atomically; returns its path."""
  path = artifacts_path(workdir)
  atomic.write_npz(path, artifacts)
  return path


def ranks_of(artifacts: dict, prefix: str = RANKS_PREFIX) -> dict[str, np.ndarray]:
  """{row key: ranks} of the arrays of an artifacts dict (or of a loaded artifacts.npz)."""
  keys = artifacts.files if hasattr(artifacts, "files") else list(artifacts)
  return {k.removeprefix(prefix): np.asarray(artifacts[k]) for k in keys if k.startswith(prefix)}
