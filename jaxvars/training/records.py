"""What shaped each stage's checkpoints, and what training it has done: a JSON record beside
every stage's Orbax checkpoints (``<checkpoints>/<stage>/jaxvars_stage.json``).

* ``fields``: the config fields the stage depends on (its own and every upstream stage's),
  so that a rerun with other settings in the same workdir is caught instead of silently
  restoring the old stage (:func:`check_workdir`).
* ``history`` and ``seconds``: the stage's per-epoch metrics and training time over every
  run that trained it, so a resumed or restored stage loses none of them.

Writes are atomic.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging

from jaxvars import atomic
from jaxvars.errors import CheckpointError, ConfigError

RECORD = "jaxvars_stage.json"
RESUME_MODES = ("error", "retrain_changed")  # config.resume
RECOMMENDER = "recommender"

# Config fields (dotted prefixes) each kind of stage depends on.
_UPSTREAM = ("seed", "data.", "backbone.arch", "backbone.width", "backbone.small_stem",
             "backbone.init", "backbone.feature_norm", "recommender.")
_DEFENCE = ("defense.", "loss.", "denoiser.channels", "denoiser.num_blocks", "denoiser.patch",
            "denoiser.attn_dim", "denoiser.heads", "detector.hidden", "detector.dim",
            "detector.temperature", "detector.train_encoder", "detector.holdout_items",
            "attack.pgd_steps", "attack.pgd_alpha", "attack.pgd_alpha_ratio",
            "attack.random_start")
_NOT_SHAPING = ("defense.checkpoint_every_steps",)


def flatten(config) -> dict:
  """{'a.b.c': value} of a (nested) ConfigDict or dict; tuples become lists (JSON)."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(value, path + ".")
      else:
        out[path] = list(value) if isinstance(value, tuple) else value
  walk(config, "")
  return out


def stage_fields(config, stage: str, stages=()) -> dict:
  """The config fields that shape ``stage`` ('recommender' or a defence stage, whose
  ``stages`` are the defence stages run up to and including it). A field that is None (an
  option left unset, e.g. ``loss.content_clean``) is left out, so adding such an option
  keeps the records of existing workdirs valid."""
  flat = flatten(config.to_dict() if hasattr(config, "to_dict") else config)
  prefixes = _UPSTREAM if stage == RECOMMENDER else _UPSTREAM + _DEFENCE + tuple(
      f"stages.{s}." for s in stages)
  return {k: v for k, v in sorted(flat.items())
          if k.startswith(prefixes) and k not in _NOT_SHAPING and v is not None}


def shaping_fields(config, stage: str, stages) -> dict:
  """:func:`stage_fields` of a defence stage without the settings that cannot change what
  ``stages`` (the defence stages up to and including ``stage``) train: the weights of loss
  terms none of them uses, and ``detector.train_encoder`` when none of them trains the
  detector (the encoder copy is then a frozen passenger). Two configs with equal shaping
  fields train the stage to the same parameters (what :func:`jaxvars.training.defense.
  adopt_stages` relies on; tested in tests/test_ablation_reuse.py)."""
  fields = stage_fields(config, stage, stages)
  used = set().union(*(set(config.stages[s].terms) for s in stages))
  # A weight shapes nothing where its term is unused (loss.content_clean: the content term).
  drop = {f"loss.{w}" for w in config.loss if w.removesuffix("_clean") not in used}
  if not any("detector" in config.stages[s].trainable for s in stages):
    drop.add("detector.train_encoder")
  return {k: v for k, v in fields.items() if k not in drop}


def load(directory: str) -> dict | None:
  """The record in ``directory``, or None.

  Raises:
    CheckpointError: an unreadable record (named, with how to recover).
  """
  path = os.path.join(directory, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); delete {directory} to retrain that "
                          "stage, or use a fresh --workdir") from None


def save(directory: str, *, fields: dict, history: list, seconds: float, done: bool,
         adopted_from: str | None = None) -> None:
  """Writes the record of ``directory`` (atomically); ``adopted_from``: the stage directory
  whose parameters this one took instead of training (``seconds`` is then 0)."""
  os.makedirs(directory, exist_ok=True)
  record = {"fields": fields, "history": history, "seconds": seconds, "done": done}
  if adopted_from:
    record["adopted_from"] = adopted_from
  atomic.write_json(os.path.join(directory, RECORD), record)


def differences(old: dict, new: dict) -> list[str]:
  """Lines 'config.x: old -> new' of the fields that differ."""
  show = lambda d, k: repr(d[k]) if k in d else "(absent)"
  return [f"config.{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
          if (k in old) != (k in new) or old.get(k) != new.get(k)]


def check_workdir(workdir: str, expected: dict, *, resume: str) -> list[str]:
  """Compares every stage's record in ``<workdir>/checkpoints`` with the fields this run
  would train it with (``expected``: {stage: fields}).

  With ``resume='retrain_changed'`` the checkpoints of every changed stage are removed (it
  and everything downstream of it then retrain, since downstream fields include upstream
  ones). Returns the names of the removed stages.

  Raises:
    ConfigError: a stage's fields differ and ``resume='error'``: the message lists the
      differences and the two ways forward.
  """
  changed = {}
  for stage, fields in expected.items():
    directory = os.path.join(workdir, "checkpoints", stage)
    record = load(directory)
    if record is not None and record["fields"] != fields:
      changed[stage] = differences(record["fields"], fields)
  if not changed:
    return []
  if resume != "retrain_changed":
    lines = [f"{stage}: " + "; ".join(diff[:8]) + (f"; ... ({len(diff)} fields)"
                                                   if len(diff) > 8 else "")
             for stage, diff in changed.items()]
    raise ConfigError(
        f"{workdir} holds stages trained with other settings: " + " | ".join(lines) +
        ". Either use a fresh --workdir, or pass --config.resume=retrain_changed to retrain "
        "exactly these stages (and everything downstream of them) here")
  for stage in changed:
    logging.warning("config.resume=retrain_changed: retraining stage %s (%s)", stage,
                    "; ".join(changed[stage][:4]))
    shutil.rmtree(os.path.join(workdir, "checkpoints", stage))
  return list(changed)
