"""Validation of an experiment config (see ``configs/joint.py``).

``validate(config)`` is called before any work starts, so that a typo in a
command-line override stops the run with one message naming the field, instead
of failing deep inside training.
"""

import ast
import os
from collections.abc import Iterable

import ml_collections

from jaxvars.errors import ConfigError

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Fields an ablation variant may override: the defence's training, not the shared models.
ABLATION_FIELDS = ("loss.", "stages.", "defense.", "detector.temperature", "detector.fpr",
                   "denoiser.rand_")


def _one_of(config, path: str, choices: Iterable[str]):
  value = _get(config, path)
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} is not one of {choices}")


def _positive(config, path: str, *, allow_zero: bool = False):
  value = _get(config, path)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    need = "a number >= 0" if allow_zero else "a number > 0"
    raise ConfigError(f"config.{path}={value!r} must be {need}")


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing (config built from {config.get('presets')!r})")
    node = node[part]
  return node


def pgd_alpha(attack: ml_collections.ConfigDict, eps: float) -> float:
  """PGD step size (1/255 units) at budget ``eps`` (1/255): ``attack.pgd_alpha_ratio * eps``,
  or the fixed ``attack.pgd_alpha`` when the ratio is 0 (or absent)."""
  ratio = float(attack.get("pgd_alpha_ratio", 0.0) or 0.0)
  return ratio * float(eps) if ratio > 0 else float(attack.pgd_alpha)


def parse_override(text: str) -> tuple[str, object]:
  """``'loss.perceptual=0'`` -> ``('loss.perceptual', 0)``; the value is a Python literal
  (``ast.literal_eval``) or, failing that, the string itself.

  Raises:
    ConfigError: text without ``=`` or with an empty path.
  """
  path, sep, raw = str(text).partition("=")
  path = path.strip()
  if not sep or not path:
    raise ConfigError(f"override {text!r} is not of the form 'path.to.field=value'")
  try:
    value = ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError):
    value = raw.strip()
  return path, value


def apply_overrides(config: ml_collections.ConfigDict, overrides, *,
                    where: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every ``'path=value'`` of ``overrides`` applied.

  Raises:
    ConfigError: an unknown field (named, with ``where`` saying which list it came from)
      or a value of the wrong type.
  """
  new = ml_collections.ConfigDict(config.to_dict())
  for text in overrides:
    path, value = parse_override(text)
    *parents, leaf = path.split(".")
    node = new
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"{where}: override {text!r} names no field config.{path}")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"{where}: override {text!r} names no field config.{path}")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{where}: override {text!r}: config.{path} holds "
                        f"{type(old).__name__}, got {value!r} ({e})") from None
  return new


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that the training and evaluation code reads.

  Raises:
    ConfigError: naming the first field whose value is missing or out of range.
  """
  _one_of(config, "data.name", ("synthetic", "hm", "folder"))
  if config.data.name in ("hm", "folder") and not config.data.manual_dir:
    raise ConfigError(
        f"config.data.manual_dir is empty but data.name={config.data.name!r} reads its files "
        "from it; pass --config.data.manual_dir=/path/to/data")
  _one_of(config, "data.split", ("random", "time"))
  _one_of(config, "data.missing_images", ("error", "drop"))
  for path in ("data.image_size", "data.min_user_interactions", "data.eval_negatives",
               "backbone.width", "backbone.feature_batch_size", "vbpr.factors",
               "vbpr.visual_factors", "vbpr.epochs", "vbpr.batch_size", "vbpr.lr",
               "eval.batch_users", "checkpoint.max_to_keep", "checkpoint.every_epochs"):
    _positive(config, path)
  if config.data.image_size < 16:
    raise ConfigError(f"config.data.image_size={config.data.image_size} is too small; use >= 16")
  for path in ("vbpr.reg", "vbpr.reg_visual", "vbpr.init_scale", "vbpr.lr_drop_factor",
               "vbpr.lr_drop_epochs", "eval.every_epochs", "num_devices", "data.min_rating"):
    _positive(config, path, allow_zero=True)
  if config.vbpr.lr_drop_epochs > config.vbpr.epochs:
    raise ConfigError(f"config.vbpr.lr_drop_epochs={config.vbpr.lr_drop_epochs} exceeds "
                      f"config.vbpr.epochs={config.vbpr.epochs}")
  _one_of(config, "backbone.arch", RESNET_ARCHS)
  init = config.backbone.init
  kind, _, path = init.partition(":")
  if not (init == "random" or (kind in ("pretrained", "self_supervised") and path)):
    raise ConfigError(f"config.backbone.init={init!r} is not 'random', "
                      "'pretrained:<path to .pth, .safetensors, .h5 or a converted directory>' "
                      "or 'self_supervised:<workdir of configs/pretrain.py>'")
  if kind == "pretrained" and not os.path.exists(path):
    raise ConfigError(f"config.backbone.init={init!r}: {path} does not exist")
  if kind == "self_supervised" and not os.path.isdir(os.path.join(path, "backbone")):
    raise ConfigError(f"config.backbone.init={init!r}: {os.path.join(path, 'backbone')} does "
                      "not exist; run configs/pretrain.py with that --workdir first")
  if config.get("task", "joint") == "pretrain":
    for field in ("pretrain.epochs", "pretrain.batch_size", "pretrain.lr", "pretrain.temperature",
                  "pretrain.min_area", "pretrain.head_hidden", "pretrain.head_dim"):
      _positive(config, field)
  _one_of(config, "backbone.feature_norm", ("standardize", "l2", "none"))
  _one_of(config, "vbpr.form", ("tang", "he"))
  _one_of(config, "denoiser.rand_pad", ("zero", "border"))
  if not 0.0 < config.denoiser.rand_min_scale <= 1.0:
    raise ConfigError(f"config.denoiser.rand_min_scale={config.denoiser.rand_min_scale} must be "
                      "in (0, 1]")
  if config.data.image_size % config.denoiser.patch:
    raise ConfigError(f"config.data.image_size={config.data.image_size} is not divisible by "
                      f"config.denoiser.patch={config.denoiser.patch}")
  for name, stage in config.stages.items():
    if len(tuple(stage.mix)) != 3 or min(stage.mix) < 0 or sum(stage.mix) <= 0:
      raise ConfigError(f"config.stages.{name}.mix={tuple(stage.mix)!r} must be 3 non-negative "
                        "(clean, fgsm, pgd) proportions with a positive sum")
    bad = set(stage.trainable) - {"vbpr", "denoiser", "detector"}
    if bad:
      raise ConfigError(f"config.stages.{name}.trainable has unknown group(s) {sorted(bad)}; "
                        "expected 'vbpr', 'denoiser', 'detector'")
    bad = set(stage.terms) - {"content", "perceptual", "contrastive", "bpr"}
    if bad:
      raise ConfigError(f"config.stages.{name}.terms has unknown term(s) {sorted(bad)}; "
                        "expected 'content', 'perceptual', 'contrastive', 'bpr'")
    _positive(config, f"stages.{name}.epochs", allow_zero=True)
    _positive(config, f"stages.{name}.lr")
  for path in ("attack.pgd_steps", "attack.pgd_alpha", "attack.batch_size",
               "attack.triplets_per_item", "defense.batch_size", "defense.train_eps",
               "defense.triplets_per_item", "defense.checkpoint_every_steps",
               "detector.temperature", "detector.fpr", "detector.holdout_items",
               "detector.calibration_items", "denoiser.channels", "denoiser.attn_dim",
               "denoiser.heads", "denoiser.patch"):
    _positive(config, path)
  for path in ("loss.content", "loss.perceptual", "loss.contrastive", "loss.bpr",
               "denoiser.num_blocks", "defense.items_per_epoch"):
    _positive(config, path, allow_zero=True)
  choices = tuple(config.defense.get("train_eps_choices", ()) or ())
  if choices and (min(choices) <= 0 or not all(isinstance(e, (int, float)) for e in choices)):
    raise ConfigError(f"config.defense.train_eps_choices={choices!r} must hold positive budgets "
                      "(1/255 units); () = always config.defense.train_eps")
  if tuple(config.attack.eval_eps) and min(config.attack.eval_eps) <= 0:
    raise ConfigError(f"config.attack.eval_eps={tuple(config.attack.eval_eps)!r} must hold "
                      "positive budgets (1/255 units); () = clean evaluation only")
  if "pgd_alpha_ratio" in config.attack:
    _positive(config, "attack.pgd_alpha_ratio", allow_zero=True)
  ablation = config.get("ablation")
  if ablation is not None and len(ablation.get("variants", {})):
    _positive(config, "ablation.eps")
    bad = set(ablation.attacks) - {"fgsm", "pgd"}
    if bad or not tuple(ablation.attacks):
      raise ConfigError(f"config.ablation.attacks={tuple(ablation.attacks)!r} must be a non-empty "
                        "tuple of 'fgsm' and/or 'pgd'")
    for name, overrides in ablation.variants.items():
      if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"config.ablation.variants.{name}={overrides!r} must be a tuple of "
                          "'path.to.field=value' strings")
      for text in overrides:
        path = parse_override(text)[0]
        if not path.startswith(ABLATION_FIELDS):
          raise ConfigError(
              f"config.ablation.variants.{name}: override {text!r} changes config.{path}, which "
              "the ablation shares with the main run (data, backbone, VBPR, attacks, model "
              f"shapes); ablations may change only {', '.join(f + '*' for f in ABLATION_FIELDS)}")
      validate(apply_overrides(_without_ablations(config), overrides,
                               where=f"config.ablation.variants.{name}"))
  if config.denoiser.attn_dim % 4 or config.denoiser.attn_dim % config.denoiser.heads:
    raise ConfigError(f"config.denoiser.attn_dim={config.denoiser.attn_dim} must be divisible "
                      f"by 4 and by config.denoiser.heads={config.denoiser.heads}")
  _one_of(config, "vbpr.optimizer", ("adam", "sgd", "adamw"))
  ks = tuple(config.eval.ks)
  if not ks or any((not isinstance(k, int)) or k <= 0 for k in ks):
    raise ConfigError(f"config.eval.ks={ks!r} must be a non-empty tuple of positive integers")
  if max(ks) > config.data.eval_negatives + 1:
    raise ConfigError(f"config.eval.ks={ks!r}: a cut-off exceeds the {config.data.eval_negatives + 1} "
                      "ranked candidates (data.eval_negatives + 1)")
  if config.data.name == "synthetic":
    for path in ("data.synthetic.num_users", "data.synthetic.num_items",
                 "data.synthetic.mean_interactions"):
      _positive(config, path)


def _without_ablations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  new = ml_collections.ConfigDict(config.to_dict())
  new.ablation.variants = ml_collections.ConfigDict()
  return new
