"""Validation of an experiment config (see ``configs/joint.py``), one validator per section.

``validate(config)`` runs before any work starts, so that a typo in a command-line
override stops the run with one message naming the field instead of failing deep inside
training. Allowed values come from the component that owns them: backbone, recommender,
attack method, objective and system names from their registries, and the other choices
from the module that implements them. The ablations' ``'path=value'`` overrides are
:mod:`jaxvars.overrides`.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

from jaxvars import fs
from jaxvars.errors import ConfigError
from jaxvars.overrides import (ablation_variants, apply_overrides, parse_override,
                               without_ablations)

# Fields an ablation variant may override: the defence's training, not the shared models.
ABLATION_FIELDS = ("loss.", "stages.", "defense.", "detector.temperature", "detector.fpr",
                   "detector.train_encoder", "denoiser.rand_")


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing (config built from {config.get('presets')!r})")
    node = node[part]
  return node


def one_of(config, path: str, choices: Iterable[str]) -> None:
  """Raises ConfigError unless ``config.<path>`` is one of ``choices``."""
  value, choices = _get(config, path), tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} is not one of {choices}")


def positive(config, path: str, *, allow_zero: bool = False, integer: bool = False) -> None:
  """Raises ConfigError unless ``config.<path>`` is a number > 0 (>= 0 with ``allow_zero``)."""
  value = _get(config, path)
  kinds = (int,) if integer else (int, float)
  ok = isinstance(value, kinds) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    need = ("an integer" if integer else "a number") + (" >= 0" if allow_zero else " > 0")
    raise ConfigError(f"config.{path}={value!r} must be {need}")


MAX_SEED = 2 ** 63 - 1  # jax.random.key takes a signed 64-bit seed; numpy any int >= 0.


def seed(config, path: str) -> None:
  """Raises ConfigError unless ``config.<path>`` is an integer seed in [0, 2**63 - 1]."""
  value = _get(config, path)
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
    raise ConfigError(f"config.{path}={value!r} must be an integer seed in [0, 2**63 - 1]")


def _budgets(config, path: str, *, allow_empty: bool = True) -> None:
  values = tuple(_get(config, path) or ())
  if not values and not allow_empty:
    raise ConfigError(f"config.{path} is empty")
  for e in values:
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 255:
      raise ConfigError(f"config.{path}={values!r} must hold budgets in (0, 255] (1/255 units)")


# ---------------------------------------------------------------------------
# One validator per section.
# ---------------------------------------------------------------------------

def _top(config) -> None:
  from jaxvars.models import COMPUTE_DTYPES
  from jaxvars.training.records import RESUME_MODES
  positive(config, "num_devices", allow_zero=True, integer=True)
  seed(config, "seed")
  if "dtype" in config:
    one_of(config, "dtype", COMPUTE_DTYPES)
  if "resume" in config:
    one_of(config, "resume", RESUME_MODES)


def _data(config) -> None:
  from jaxvars.data import builders
  one_of(config, "data.name", builders.BUILDERS)
  if config.data.name in ("hm", "folder") and not config.data.manual_dir:
    raise ConfigError(
        f"config.data.manual_dir is empty but data.name={config.data.name!r} reads its files "
        "from it; pass --config.data.manual_dir=/path/to/data")
  one_of(config, "data.split", ("random", "time"))
  one_of(config, "data.missing_images", ("error", "drop"))
  if "image_store" in config.data:
    from jaxvars.data.pipeline import IMAGE_STORES
    one_of(config, "data.image_store", IMAGE_STORES)
  for path in ("data.image_size", "data.min_user_interactions", "data.eval_negatives"):
    positive(config, path, integer=True)
  if config.data.image_size < 16:
    raise ConfigError(f"config.data.image_size={config.data.image_size} is too small; use >= 16")
  if config.data.min_user_interactions < 2:
    raise ConfigError(f"config.data.min_user_interactions={config.data.min_user_interactions} "
                      "must be >= 2: leave-one-out holds one item of each user out and trains on "
                      "the rest")
  positive(config, "data.min_rating", allow_zero=True)
  seed(config, "data.split_seed")
  if config.data.name == "synthetic":
    from jaxvars.data.synthetic import MIN_ITEMS
    for path in ("data.synthetic.num_users", "data.synthetic.num_items"):
      positive(config, path, integer=True)
    positive(config, "data.synthetic.mean_interactions")
    seed(config, "data.synthetic.seed")
    if config.data.synthetic.num_items < MIN_ITEMS:
      raise ConfigError(f"config.data.synthetic.num_items={config.data.synthetic.num_items} must "
                        f"be >= {MIN_ITEMS} (every user buys at least 5 items and leaves at least "
                        "101 untouched, for the evaluation negatives)")


def _backbone(config) -> None:
  from jaxvars.backbones import BACKBONES
  from jaxvars.features import FEATURE_NORMS
  b = config.backbone
  BACKBONES.check(b.arch, "config.backbone.arch")
  BACKBONES.get(b.arch).validate(b)
  positive(config, "backbone.feature_batch_size", integer=True)
  one_of(config, "backbone.feature_norm", FEATURE_NORMS)
  init = b.init
  kind, _, path = init.partition(":")
  if not (init == "random" or (kind in ("pretrained", "self_supervised") and path)):
    raise ConfigError(f"config.backbone.init={init!r} is not 'random', 'pretrained:imagenet', "
                      "'pretrained:<path to .pth, .safetensors, .h5 or a converted directory>' "
                      "or 'self_supervised:<workdir of configs/pretrain.py>'")
  if kind == "pretrained" and path != "imagenet" and not fs.exists(path):
    raise ConfigError(f"config.backbone.init={init!r}: {path} does not exist")
  if kind == "self_supervised" and not fs.isdir(fs.join(path, "backbone")):
    raise ConfigError(f"config.backbone.init={init!r}: {fs.join(path, 'backbone')} does "
                      "not exist; run configs/pretrain.py with that --workdir first")


def _recommender(config) -> None:
  from jaxvars.recommenders import RECOMMENDERS
  from jaxvars.training.recommender import OPTIMIZERS
  r = config.recommender
  entry = RECOMMENDERS.get(r.name, "config.recommender.name")
  entry.validate(r)
  training = [name for name, stage in (config.stages.items() if "stages" in config else ())
              if "recommender" in tuple(stage.get("trainable", ())) and stage.get("epochs")]
  if training and entry.build(r, num_users=1, num_items=1, feature_dim=1).fitted:
    raise ConfigError(f"config.stages.{training[0]}.trainable includes 'recommender', but "
                      f"config.recommender.name={r.name!r} is fitted in closed form, not "
                      "trained; remove 'recommender' from its trainable groups")
  for path in ("recommender.epochs", "recommender.batch_size"):
    positive(config, path, integer=True)
  positive(config, "recommender.lr")
  positive(config, "recommender.lr_drop_factor", allow_zero=True)
  positive(config, "recommender.lr_drop_epochs", allow_zero=True, integer=True)
  if r.lr_drop_epochs > r.epochs:
    raise ConfigError(f"config.recommender.lr_drop_epochs={r.lr_drop_epochs} exceeds "
                      f"config.recommender.epochs={r.epochs}")
  one_of(config, "recommender.optimizer", OPTIMIZERS)
  others = config.get("recommenders", ())
  if isinstance(others, str) or not all(isinstance(n, str) for n in others):
    raise ConfigError(f"config.recommenders={others!r}: expected a tuple of registered "
                      f"recommender names, e.g. ('vbpr', 'amr'); registered: "
                      f"{', '.join(RECOMMENDERS.names())}")
  for name in others:
    if name not in RECOMMENDERS:
      raise ConfigError(f"config.recommenders: {name!r} is not a registered recommender; "
                        f"registered: {', '.join(RECOMMENDERS.names())}")
    if name != r.name:
      RECOMMENDERS.get(name).validate(r)


def _attack(config) -> None:
  from jaxvars.attacks.objectives import OBJECTIVES
  from jaxvars.attacks.spec import METHODS
  a = config.attack
  _budgets(config, "attack.eval_eps")
  if not tuple(a.methods):
    raise ConfigError("config.attack.methods is empty; name at least one of "
                      f"{METHODS.names()}")
  for m in a.methods:
    METHODS.check(m, "config.attack.methods")
  OBJECTIVES.check(a.objective, "config.attack.objective")
  for path in ("attack.pgd_steps", "attack.batch_size", "attack.triplets_per_item"):
    positive(config, path, integer=True)
  positive(config, "attack.pgd_alpha")
  positive(config, "attack.pgd_alpha_ratio", allow_zero=True)
  if "whitebox_table" in a:
    from jaxvars.attacks.whitebox import WHITEBOX_TABLES
    one_of(config, "attack.whitebox_table", WHITEBOX_TABLES)
  if "seed" in a:
    seed(config, "attack.seed")
  if a.get("cw") is not None:
    _cw(config)
  ad = a.get("adaptive")
  if ad is not None:
    from jaxvars.defenses import SYSTEMS
    _budgets(config, "attack.adaptive.eps")
    for m in ad.methods:
      METHODS.check(m, "config.attack.adaptive.methods")
    for o in ad.objectives:
      OBJECTIVES.check(o, "config.attack.adaptive.objectives")
    for s in ad.systems:
      _whitebox_system(config, s, "config.attack.adaptive.systems")
    positive(config, "attack.adaptive.eot_samples", integer=True)
    positive(config, "attack.adaptive.restarts", integer=True)
    for lam in ad.detector_lambdas:
      if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ConfigError(f"config.attack.adaptive.detector_lambdas={tuple(ad.detector_lambdas)!r} "
                          "must hold numbers >= 0")


def _cw(config) -> None:
  """config.attack.cw: C&W's settings (jaxvars/attacks/cw.py)."""
  cw = config.attack.cw
  for path in ("steps", "binary_search_steps"):
    positive(config, f"attack.cw.{path}", integer=True)
  for path in ("initial_c", "lr"):
    positive(config, f"attack.cw.{path}")
  for path in ("kappa", "loss_margin"):
    positive(config, f"attack.cw.{path}", allow_zero=True)
  if not isinstance(cw.get("bounded", False), bool):
    raise ConfigError(f"config.attack.cw.bounded={cw.bounded!r} must be True (C&W at every "
                      "eps of config.attack.eval_eps, kept in the eps-ball) or False (no L-inf "
                      "budget: condition 'cw@255')")


def _targeted(config) -> None:
  from jaxvars.attacks.objectives import OBJECTIVES
  from jaxvars.attacks.spec import METHODS
  from jaxvars.defenses import SYSTEMS
  t = config.get("targeted")
  if t is None:
    return
  positive(config, "targeted.num_targets", allow_zero=True, integer=True)
  if not t.num_targets:
    return
  for o in tuple(t.objectives) + (t.whitebox_objective,):
    OBJECTIVES.check(o, "config.targeted.objectives")
  for m in t.methods:
    METHODS.check(m, "config.targeted.methods")
  for s in t.whitebox_systems:
    _whitebox_system(config, s, "config.targeted.whitebox_systems")
  _budgets(config, "targeted.eps", allow_empty=False)
  positive(config, "targeted.hook_items", integer=True)
  for field in ("targeted.hr_n", "targeted.chr_k"):
    values = tuple(_get(config, field))
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
      raise ConfigError(f"config.{field}={values!r} must be a non-empty tuple of positive integers")


def _whitebox_system(config, name: str, field: str) -> None:
  """A system a white-box attack goes through: a registered name or a swept system's instance
  (``jpeg_q50``); not a swept system's registered name, which stands for several settings
  (a white-box attack goes through one: name it).

  Raises:
    ConfigError: an unknown name, or the registered name of a swept system.
  """
  from jaxvars.defenses import SYSTEMS
  SYSTEMS.check(name, field)
  names = SYSTEMS.expand(config, (name,))
  if SYSTEMS.swept(config, name) and names:  # An empty sweep: _systems names the field.
    sw = SYSTEMS.get(name).sweep
    raise ConfigError(f"{field} names {name!r}, but config.systems.{sw.field}="
                      f"{tuple(_get(config, 'systems.' + sw.field))!r} sweeps it into {names}; "
                      f"a white-box attack goes through one setting: name it (e.g. {names[0]!r})")


def _systems(config) -> None:
  from jaxvars.defenses import SYSTEMS
  names = tuple(config.systems.evaluate)
  if not names:
    raise ConfigError(f"config.systems.evaluate is empty; name some of {SYSTEMS.names()}")
  for name in names:
    SYSTEMS.get(name, "config.systems.evaluate").validate(config)


def _denoiser(config) -> None:
  from jaxvars.defenses.transforms import RAND_ORDERS, RAND_PADS
  dn = config.denoiser
  one_of(config, "denoiser.rand_pad", RAND_PADS)
  one_of(config, "denoiser.rand_order", RAND_ORDERS)
  if not 0.0 < dn.rand_min_scale <= 1.0:
    raise ConfigError(f"config.denoiser.rand_min_scale={dn.rand_min_scale} must be in (0, 1]")
  for path in ("denoiser.channels", "denoiser.attn_dim", "denoiser.heads", "denoiser.patch"):
    positive(config, path, integer=True)
  positive(config, "denoiser.num_blocks", allow_zero=True, integer=True)
  if config.data.image_size % dn.patch:
    raise ConfigError(f"config.data.image_size={config.data.image_size} is not divisible by "
                      f"config.denoiser.patch={dn.patch}")
  if dn.attn_dim % 4 or dn.attn_dim % dn.heads:
    raise ConfigError(f"config.denoiser.attn_dim={dn.attn_dim} must be divisible by 4 and by "
                      f"config.denoiser.heads={dn.heads}")


def _detector(config) -> None:
  for path in ("detector.hidden", "detector.dim", "detector.holdout_items",
               "detector.calibration_items"):
    positive(config, path, integer=True)
  positive(config, "detector.temperature")
  if not 0.0 < config.detector.fpr < 1.0:
    raise ConfigError(f"config.detector.fpr={config.detector.fpr!r} must be in (0, 1)")
  _budgets(config, "detector.noise_sigmas")
  if not isinstance(config.detector.train_encoder, bool):
    raise ConfigError(f"config.detector.train_encoder={config.detector.train_encoder!r} must be "
                      "True or False")
  from jaxvars.defenses.baselines import DETECTION_BASELINES
  baselines = config.detector.get("baselines", ())
  if isinstance(baselines, str) or len(set(baselines)) != len(tuple(baselines)):
    raise ConfigError(f"config.detector.baselines={baselines!r} must be a tuple of distinct names "
                      f"of {DETECTION_BASELINES.names()}")
  for name in baselines:
    DETECTION_BASELINES.get(name, "config.detector.baselines").validate(config)


def _loss(config) -> None:
  from jaxvars.training.defense_step import LOSS_TERMS
  for term in LOSS_TERMS:
    positive(config, f"loss.{term}", allow_zero=True)


def _defense(config) -> None:
  for path in ("defense.batch_size", "defense.triplets_per_item", "defense.checkpoint_every_steps"):
    positive(config, path, integer=True)
  _budgets(config, "defense.train_eps_choices")
  if not 0 < config.defense.train_eps <= 255:
    raise ConfigError(f"config.defense.train_eps={config.defense.train_eps!r} must be in (0, 255]")
  positive(config, "defense.items_per_epoch", allow_zero=True, integer=True)
  if "bpr_other" in config.defense:
    from jaxvars.training.defense_step import BPR_OTHER
    one_of(config, "defense.bpr_other", BPR_OTHER)
  frac = config.defense.eval_fraction
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 0.9:
    raise ConfigError(f"config.defense.eval_fraction={frac!r} must be in [0, 0.9]")


def _stages(config) -> None:
  from jaxvars.models import PARAM_GROUPS
  from jaxvars.training.defense_step import INPUT_KINDS, LOSS_TERMS
  for name, stage in config.stages.items():
    mix = tuple(stage.mix)
    if len(mix) != len(INPUT_KINDS) or min(mix) < 0 or sum(mix) <= 0:
      raise ConfigError(f"config.stages.{name}.mix={mix!r} must be {len(INPUT_KINDS)} "
                        f"non-negative {INPUT_KINDS} proportions with a positive sum")
    bad = set(stage.trainable) - set(PARAM_GROUPS)
    if bad:
      raise ConfigError(f"config.stages.{name}.trainable has unknown group(s) {sorted(bad)}; "
                        f"expected some of {PARAM_GROUPS}")
    bad = set(stage.terms) - set(LOSS_TERMS)
    if bad:
      raise ConfigError(f"config.stages.{name}.terms has unknown term(s) {sorted(bad)}; "
                        f"expected some of {LOSS_TERMS}")
    positive(config, f"stages.{name}.epochs", allow_zero=True, integer=True)
    positive(config, f"stages.{name}.lr")


def _eval(config) -> None:
  positive(config, "eval.batch_users", integer=True)
  positive(config, "eval.rand_draws", integer=True)
  positive(config, "eval.max_items", allow_zero=True, integer=True)
  positive(config, "eval.bootstrap_resamples", integer=True)
  seed(config, "eval.bootstrap_seed")
  positive(config, "eval.every_epochs", allow_zero=True, integer=True)
  ks = tuple(config.eval.ks)
  if not ks or any((not isinstance(k, int)) or isinstance(k, bool) or k <= 0 for k in ks):
    raise ConfigError(f"config.eval.ks={ks!r} must be a non-empty tuple of positive integers")
  if max(ks) > config.data.eval_negatives + 1:
    raise ConfigError(f"config.eval.ks={ks!r}: a cut-off exceeds the "
                      f"{config.data.eval_negatives + 1} ranked candidates "
                      "(data.eval_negatives + 1)")


def _checkpoint(config) -> None:
  positive(config, "checkpoint.max_to_keep", integer=True)
  positive(config, "checkpoint.every_epochs", integer=True)


def _pretrain(config) -> None:
  if config.get("task", "joint") != "pretrain":
    return
  for field in ("pretrain.epochs", "pretrain.batch_size", "pretrain.lr", "pretrain.temperature",
                "pretrain.min_area", "pretrain.head_hidden", "pretrain.head_dim"):
    positive(config, field)


def _ablation(config) -> None:
  from jaxvars.attacks.spec import METHODS
  ablation = config.get("ablation")
  variants = ablation_variants(config)
  if not variants:
    return
  if not 0 < ablation.eps <= 255:
    raise ConfigError(f"config.ablation.eps={ablation.eps!r} must be in (0, 255]")
  if not tuple(ablation.attacks):
    raise ConfigError("config.ablation.attacks is empty; name some of "
                      f"{METHODS.names()}")
  for m in ablation.attacks:
    METHODS.check(m, "config.ablation.attacks")
  for name, overrides in variants.items():
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
      raise ConfigError(f"config.ablation.variants.{name}={overrides!r} must be a tuple of "
                        "'path.to.field=value' strings")
    for text in overrides:
      path = parse_override(text)[0]
      if not path.startswith(ABLATION_FIELDS):
        raise ConfigError(
            f"config.ablation.variants.{name}: override {text!r} changes config.{path}, which "
            "the ablation shares with the main run (data, backbone, recommender, attacks, "
            f"model shapes); ablations may change only {', '.join(f + '*' for f in ABLATION_FIELDS)}")
    validate(apply_overrides(without_ablations(config), overrides,
                             where=f"config.ablation.variants.{name}"))


VALIDATORS = (_top, _data, _backbone, _recommender, _attack, _targeted, _systems, _denoiser, _detector,
              _loss, _defense, _stages, _eval, _checkpoint, _pretrain, _ablation)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that training and evaluation read, section by section.

  Raises:
    ConfigError: naming the first field whose value is missing or out of range.
  """
  for check in VALIDATORS:
    check(config)
