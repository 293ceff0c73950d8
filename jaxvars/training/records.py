"""What shaped each stage's checkpoints, and what training it has done: a JSON record beside
every stage's Orbax checkpoints (``<checkpoints>/<stage>/jaxvars_stage.json``).

* ``fields``: the config fields the stage depends on (its own and every upstream stage's),
  so that a rerun with other settings in the same workdir is caught instead of silently
  restoring the old stage (:func:`check_workdir`).
* ``inputs``: fingerprints of what the stage was trained on (:func:`stage_inputs`): the
  source content of the prepared data tables (``data:<file>``: the sha256 of each CSV and
  the content fingerprint of ``images/`` that :mod:`jaxvars.data.pipeline` names its tables
  after), the split (``split.npz``: :func:`split_fingerprint` of its arrays), the backbone
  weights (``weights``: sha256 of the weights file, :func:`jaxvars.backbones.weights.
  content_fingerprint`; None for random weights) and, for a defence stage, the stage it
  starts from (``upstream:<stage>``: :func:`identity` of that stage's record). A changed
  input is a stated difference exactly like a changed field.
* ``history`` and ``seconds``: the stage's per-epoch metrics and training time over every
  run that trained it, so a resumed or restored stage loses none of them.

Records written before ``inputs`` existed (jaxvars before issue 33) are accepted with a
warning naming the stages whose inputs cannot be checked (:func:`changes` lists them as
``unrecorded``), not silently and not refused: such a workdir keeps resuming, and a stage
that trains again records its inputs from then on. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import zipfile

import numpy as np
from absl import logging

from jaxvars import atomic, distributed, fs, workdir as wd
from jaxvars.errors import CheckpointError, ConfigError

RECORD = "jaxvars_stage.json"
RESUME_MODES = ("error", "retrain_changed")  # config.resume
RECOMMENDER = "recommender"
SPLIT_KEY = "split.npz"  # Key of the split's fingerprint in a record's inputs.
WEIGHTS_KEY = "weights"
DATA_PREFIX = "data:"
UPSTREAM_PREFIX = "upstream:"
# The arrays of split.npz that shape training and evaluation (jaxvars.data.pipeline).
SPLIT_ARRAYS = ("user_ids", "item_ids", "train_users", "train_items", "test_items",
                "eval_negatives")

# Config fields (dotted prefixes) each kind of stage depends on.
# config.dtype shapes every stage: the backbone's features (the recommender's table, the
# perceptual maps, the detector's input) and the denoiser's and detector's compute.
_UPSTREAM = ("seed", "dtype", "data.", "backbone.arch", "backbone.width", "backbone.small_stem",
             "backbone.init", "backbone.feature_norm", "recommender.")
_DEFENCE = ("defense.", "loss.", "denoiser.channels", "denoiser.num_blocks", "denoiser.patch",
            "denoiser.attn_dim", "denoiser.heads", "detector.hidden", "detector.dim",
            "detector.temperature", "detector.train_encoder", "detector.holdout_items",
            "attack.pgd_steps", "attack.pgd_alpha", "attack.pgd_alpha_ratio",
            "attack.random_start")
_NOT_SHAPING = ("defense.checkpoint_every_steps", "data.image_store", "data.mmap_dir")
# Fields added after workdirs existed, at the value that reproduces the older training: left
# out of a record at that value (as a None option is), so those workdirs' records stay valid,
# while any other value is a recorded difference that retrains the stage.
_LEGACY_DEFAULTS = {"defense.bpr_other": "clean", "dtype": "float32"}


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
  keeps the records of existing workdirs valid; so is a field of :data:`_LEGACY_DEFAULTS` at
  the value that reproduces the training from before it existed (``defense.bpr_other=
  'clean'``, ``dtype='float32'``), and so are the ``config.recommender`` fields only other
  recommenders read (:func:`_unread_recommender_fields`: AMR's adv_* in a VBPR run)."""
  flat = flatten(config.to_dict() if hasattr(config, "to_dict") else config)
  prefixes = _UPSTREAM if stage == RECOMMENDER else _UPSTREAM + _DEFENCE + tuple(
      f"stages.{s}." for s in stages)
  unread = _unread_recommender_fields(flat.get("recommender.name"))
  return {k: v for k, v in sorted(flat.items())
          if k.startswith(prefixes) and k not in _NOT_SHAPING and v is not None
          and not (k in _LEGACY_DEFAULTS and v == _LEGACY_DEFAULTS[k]) and k not in unread}


def _unread_recommender_fields(name) -> set:
  """'recommender.<field>' of the fields only other recommenders than ``name`` read (their
  ``RecommenderEntry.own_fields``, e.g. AMR's adv_*): they shape nothing this run trains,
  so a VBPR run's records leave them out (and stay valid where such a field is added),
  while an AMR run's records hold them (changing one marks its recommender stage, and
  every stage after it, changed)."""
  from jaxvars.recommenders import unread_fields
  return {f"recommender.{f}" for f in unread_fields(name)} if isinstance(name, str) else set()


def shaping_fields(config, stage: str, stages) -> dict:
  """:func:`stage_fields` of a defence stage without the settings that cannot change what
  ``stages`` (the defence stages up to and including ``stage``) train: the weights of loss
  terms none of them uses, and ``detector.train_encoder`` when none of them trains the
  detector (the encoder copy is then a frozen passenger), and ``defense.bpr_other`` when none
  of them uses the BPR term. Two configs with equal shaping
  fields train the stage to the same parameters (what :func:`jaxvars.training.defense.
  adopt_stages` relies on; tested in tests/test_ablation_reuse.py)."""
  fields = stage_fields(config, stage, stages)
  used = set().union(*(set(config.stages[s].terms) for s in stages))
  # A weight shapes nothing where its term is unused (loss.content_clean: the content term).
  drop = {f"loss.{w}" for w in config.loss if w.removesuffix("_clean") not in used}
  if not any("detector" in config.stages[s].trainable for s in stages):
    drop.add("detector.train_encoder")
  if "bpr" not in used:
    drop.add("defense.bpr_other")
  return {k: v for k, v in fields.items() if k not in drop}


# ---- Inputs: what a stage was trained on -------------------------------------------------

def split_fingerprint(arrays) -> str:
  """sha256 (hex, 16 digits) of a split's :data:`SPLIT_ARRAYS` (``arrays``: a mapping such
  as split.npz's or a :class:`jaxvars.data.pipeline.RecData`'s attributes). Ids are hashed
  as text and indices as int64, so the split made again from the same data (same seed) has
  the same fingerprint whatever the bytes of its file (zip timestamps) or dtypes.

  Raises:
    KeyError: an array is missing.
  """
  h = hashlib.sha256()
  for key in SPLIT_ARRAYS:
    value = np.asarray(arrays[key])
    h.update(f"{key}{list(value.shape)}".encode())
    if value.dtype.kind in "USO":
      h.update("\n".join(map(str, value.ravel().tolist())).encode("utf-8", "surrogateescape"))
    else:
      h.update(np.ascontiguousarray(value, np.int64).tobytes())
  return h.hexdigest()[:16]


def read_split_fingerprint(path: str) -> str | None:
  """:func:`split_fingerprint` of the split.npz at ``path``; None where it is absent or
  unreadable (the data pipeline names a damaged one when it reads it)."""
  if not fs.exists(path):
    return None
  try:
    with fs.np_load(path, allow_pickle=False) as z:
      return split_fingerprint({k: z[k] for k in SPLIT_ARRAYS})
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError):
    return None


def identity(record: dict | None) -> str | None:
  """A stage's identity for the stages trained on top of it: sha256 (16 hex digits) of its
  record's fields, inputs and history (not its wall-clock seconds or a partial epoch), so a
  stage trained again, on anything else or to other losses, has another identity, while a
  resumed one keeps it. None for no record."""
  if record is None:
    return None
  body = {k: record.get(k) for k in ("fields", "inputs", "history")}
  return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def upstream_dir(workdir: str, stages, recommender_workdir: str | None = None) -> str:
  """The checkpoint directory of the stage the last of ``stages`` (defence stages run up to
  and including it) starts from: the previous defence stage, or for the first one the
  recommender of ``recommender_workdir`` (an ablation variant's: the main run's; default
  ``workdir``)."""
  if len(stages) > 1:
    return wd.checkpoint_dir(workdir, stages[-2])
  return wd.checkpoint_dir(recommender_workdir or workdir, RECOMMENDER)


def stage_inputs(base: dict, workdir: str, stage: str, stages=(),
                 recommender_workdir: str | None = None) -> dict:
  """The inputs a stage of ``workdir`` is trained on: ``base`` (the run's data, split and
  weights fingerprints: :func:`jaxvars.experiment.input_fingerprints`) and, for a defence
  stage (``stages``: the defence stages up to and including ``stage``), the identity of the
  stage it starts from as that stage's record holds it now (see :func:`upstream_dir`)."""
  inputs = dict(base or {})
  if stage != RECOMMENDER:
    up = upstream_dir(workdir, stages, recommender_workdir)
    inputs[UPSTREAM_PREFIX + posixpath.basename(up)] = identity(load(up))
  return inputs


def load(directory: str) -> dict | None:
  """The record in ``directory``, or None.

  Raises:
    CheckpointError: an unreadable record (named, with how to recover).
  """
  path = fs.join(directory, RECORD)
  if not fs.exists(path):
    return None
  try:
    with fs.open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); delete {directory} to retrain that "
                          "stage, or use a fresh --workdir") from None


def save(directory: str, *, fields: dict, history: list, seconds: float, done: bool,
         inputs: dict | None = None, adopted_from: str | None = None) -> None:
  """Writes the record of ``directory`` (atomically); ``inputs``: what the stage is trained
  on (:func:`stage_inputs`; None writes none, as before issue 33); ``adopted_from``: the
  stage directory whose parameters this one took instead of training (``seconds`` is then
  0)."""
  fs.makedirs(directory, exist_ok=True)
  record = {"fields": fields, "history": history, "seconds": seconds, "done": done}
  if inputs is not None:
    record["inputs"] = inputs
  if adopted_from:
    record["adopted_from"] = adopted_from
  atomic.write_json(fs.join(directory, RECORD), record)


# ---- Comparing a workdir's records with what this run would train --------------------------

def differences(old: dict, new: dict) -> list[str]:
  """Lines 'config.x: old -> new' of the fields that differ."""
  show = lambda d, k: repr(d[k]) if k in d else "(absent)"
  return [f"config.{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
          if (k in old) != (k in new) or old.get(k) != new.get(k)]


def _short(value) -> str:
  return "(none)" if value is None else str(value)[:12]


def _input_label(key: str) -> str:
  if key.startswith(DATA_PREFIX):
    return f"data {key[len(DATA_PREFIX):]} (sha256)"
  if key.startswith(UPSTREAM_PREFIX):
    return f"upstream stage {key[len(UPSTREAM_PREFIX):]} (its record)"
  if key == SPLIT_KEY:
    return "split.npz (content)"
  if key == WEIGHTS_KEY:
    return "backbone weights (sha256)"
  return key


def input_differences(old: dict, new: dict, pending=()) -> list[str]:
  """Lines 'data images/ (sha256): 0a1b2c3d4e5f -> 5f4e3d2c1b0a' of the inputs that differ
  (``pending``: keys not known yet, e.g. the split before it is made, left out)."""
  return [f"{_input_label(k)}: {_short(old.get(k)) if k in old else '(not recorded)'} -> "
          f"{_short(new.get(k)) if k in new else '(none)'}"
          for k in sorted(set(old) | set(new))
          if k not in pending and ((k in old) != (k in new) or old.get(k) != new.get(k))]


def changes(workdir: str, expected: dict, *, pending=(), upstream_changed: bool = False,
            label: str = "") -> tuple[dict, list]:
  """Compares the record of every stage of ``<workdir>/checkpoints`` with what this run
  would train it with.

  Args:
    expected: {stage: {'fields': ..., 'inputs': ...}} in training order (a stage's
      upstream comes before it).
    pending: input keys not known yet (left out of the comparison).
    upstream_changed: the stage the first of ``expected`` starts from retrains (an ablation
      variant's: the main run's recommender), so every recorded stage does too.
    label: prefix of the stage names in the returned dict (e.g. 'ablations/x/').

  Returns:
    ({label + stage: difference lines} of every stage that must retrain (it differs, or a
    stage before it does), [label + stage of every record without ``inputs``]: trained by
    an older jaxvars, whose inputs cannot be checked).
  """
  changed, unrecorded = {}, []
  for stage, want in expected.items():
    record = load(wd.checkpoint_dir(workdir, stage))
    if record is None:
      if has_checkpoints(wd.checkpoint_dir(workdir, stage)):  # Its record deleted.
        changed[label + stage] = [f"its checkpoints have no {RECORD} beside them, so the "
                                  "settings and inputs they were trained with are unknown"]
      continue
    diff = differences(record["fields"], want["fields"])
    if "inputs" in record:
      diff += input_differences(record["inputs"], want["inputs"], pending)
    else:
      unrecorded.append(label + stage)
    if not diff and (changed or upstream_changed) and stage != RECOMMENDER:
      diff = ["the stage it starts from retrains"]
    if diff:
      changed[label + stage] = diff
  return changed, unrecorded


def has_checkpoints(directory: str) -> bool:
  """Whether ``directory`` holds an Orbax checkpoint step (a sub-directory named by digits)."""
  try:
    return any(name.isdigit() for name in fs.subdirs(directory))
  except OSError:
    return False


def refuse_or_remove(workdir: str, changed: dict, *, resume: str, remove: bool = True,
                     split_misfit: bool = False) -> list:
  """Acts on :func:`changes`: raises with ``resume='error'``; with ``'retrain_changed'``
  removes each changed stage's directory (``<workdir>/<stage path>/`` under ``checkpoints``,
  ``ablations/<name>/checkpoints/<stage>`` for a variant's) when ``remove``, else only
  returns them. Call it with ``remove=True`` only once nothing can stop the run any more
  (the data and the weights are loaded), so that nothing is deleted before the run knows it
  can go on.

  Args:
    split_misfit: the workdir's split.npz does not fit this run's data (other data
      settings or CSV files): ``retrain_changed`` then needs it deleted too, which the
      advice says.

  Returns:
    The changed stage names.

  Raises:
    ConfigError: a stage differs and ``resume='error'``: the message lists the
      differences and the two ways forward.
  """
  if not changed:
    return []
  if resume != "retrain_changed":
    lines = [f"{stage}: " + "; ".join(diff[:8]) + (f"; ... ({len(diff)} differences)"
                                                   if len(diff) > 8 else "")
             for stage, diff in changed.items()]
    split = wd.split_path(workdir)
    retrain = ("pass --config.resume=retrain_changed to retrain exactly these stages (and "
               "everything downstream of them) here")
    if split_misfit:
      retrain = (f"delete {split} (made from other data or data settings) and " +
                 retrain.replace("exactly these stages (and everything downstream of them)",
                                 "these stages on a new split"))
    raise ConfigError(
        f"{workdir} holds stages trained with other settings or on other inputs: " +
        " | ".join(lines) + f". Either use a fresh --workdir, or {retrain}")
  if remove:
    for stage, diff in changed.items():
      logging.warning("config.resume=retrain_changed: retraining stage %s (%s)", stage,
                      "; ".join(diff[:4]))
      if distributed.is_main():  # One process removes; the others wait for it.
        fs.rmtree(stage_path(workdir, stage), ignore_errors=True)
    distributed.barrier("jaxvars.records retrain_changed")
  return list(changed)


def stage_path(workdir: str, stage: str) -> str:
  """The checkpoint directory of a stage named as :func:`changes` names it ('joint', or
  'ablations/<variant>/joint')."""
  head, _, name = stage.rpartition("/")
  return wd.checkpoint_dir(fs.join(workdir, head) if head else workdir, name)


def warn_unrecorded(workdir: str, unrecorded: list) -> None:
  """The warning for stages recorded before their inputs were (see the module doc)."""
  if unrecorded:
    logging.warning(
        "%s: stages %s were recorded by an older jaxvars, without the fingerprints of their "
        "data, split, backbone weights and upstream stage: restored as they are, unchecked; "
        "use a fresh --workdir to train them on this run's inputs for sure", workdir,
        ", ".join(unrecorded))


def check_workdir(workdir: str, expected: dict, *, resume: str, pending=(),
                  remove: bool = True) -> list[str]:
  """:func:`changes` of one directory then :func:`refuse_or_remove` (a warning for records
  without inputs). Returns the changed (with ``remove``: removed) stage names.

  Raises:
    ConfigError: a stage differs and ``resume='error'``.
  """
  changed, unrecorded = changes(workdir, expected, pending=pending)
  warn_unrecorded(workdir, unrecorded)
  return refuse_or_remove(workdir, changed, resume=resume, remove=remove)
