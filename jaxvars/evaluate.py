"""Evaluating a trained run: which systems and attacks the config asks for, the plan of
conditions (:mod:`jaxvars.evaluation.plan`), and :func:`evaluate_run`, which runs it
(:mod:`jaxvars.evaluation.loop`) and returns results.json's evaluation sections.

Used by :mod:`jaxvars.run` (the main run, ``--mode=evaluate``) and :mod:`jaxvars.ablations`
(each variant); it imports neither.
"""

from __future__ import annotations

from jaxvars import workdir as wd
from jaxvars.attacks.spec import attack_spec
from jaxvars.defenses import SYSTEMS
from jaxvars.evaluation.loop import EvalContext, evaluate_all
from jaxvars.evaluation.plan import PlanInputs, make_plan
from jaxvars.experiment import Experiment, backbone_summary
from jaxvars.training import defense


def trained_groups(config) -> set[str]:
  """Parameter groups some defence stage trains."""
  return {g for name in defense.stage_names(config) for g in config.stages[name].trainable}


def detector_trained(config) -> bool:
  """Whether a stage trains the detector with a (non-zero) contrastive term."""
  return config.loss.contrastive > 0 and any(
      "detector" in config.stages[n].trainable and "contrastive" in config.stages[n].terms
      for n in defense.stage_names(config))


def evaluated_systems(config, *, only_trained: bool = False) -> tuple[str, ...]:
  """``config.systems.evaluate`` without the systems whose parts no stage trained (with
  ``only_trained``: only the systems that have trained parts, as the ablations need), a swept
  system (``config.systems.jpeg_quality`` or ``bit_depth`` a tuple) as one instance per value
  (``jpeg_q90``, ...: :meth:`jaxvars.defenses.systems.SystemRegistry.expand`)."""
  trained = trained_groups(config)
  return tuple(s for s in SYSTEMS.expand(config, config.systems.evaluate)
               if set(SYSTEMS.get(s).needs) <= trained
               and (SYSTEMS.get(s).needs or not only_trained))


def attack_specs(config, *, eval_eps=None, methods=None) -> list:
  """The transfer attacks: every eps of ``eval_eps`` (default ``config.attack.eval_eps``),
  every method of ``methods`` (default ``config.attack.methods``), in that order, each
  once (an unbounded C&W is the same attack at every eps: listed at the first)."""
  eps_list = config.attack.eval_eps if eval_eps is None else eval_eps
  methods = tuple(config.attack.methods) if methods is None else methods
  return list(dict.fromkeys(attack_spec(config.attack, m, e) for e in eps_list for m in methods))


def attack_cache(config, workdir: str | None) -> str | None:
  """``<workdir>/attacks`` where attacked photos are kept (None: not kept)."""
  return wd.attacks_dir(workdir) if workdir and config.attack.cache else None


def plan_for(exp: Experiment, consts: dict, *, eval_eps=None, methods=None,
             only_trained: bool = False) -> list:
  """The plan of conditions of ``exp``'s config (see :func:`evaluate_run`)."""
  import jax
  from jaxvars.pixels import to_float
  config = exp.config
  logits = "logits" in jax.eval_shape(
      lambda x: exp.models.backbone_out(consts, to_float(x)), exp.data.images[:1])
  inputs = PlanInputs(systems=evaluated_systems(config, only_trained=only_trained),
                      transfer=tuple(attack_specs(config, eval_eps=eval_eps, methods=methods)),
                      detector=detector_trained(config),
                      uses_features=bool(exp.models.recommender.uses_features),
                      has_logits=logits,
                      has_floor=not exp.models.recommender.reads_images)
  return make_plan(config, inputs)


def evaluate_run(exp: Experiment, params: dict, consts: dict, *, eval_eps=None, methods=None,
                 only_trained: bool = False, cache_dir=-1, cached_time: bool = False,
                 detect: bool | None = None, fidelity: bool | None = None,
                 mostpop: bool | None = None, baselines: bool | None = None) -> tuple[dict, dict]:
  """Every system under every condition for the trained ``params``.

  A defended system is evaluated only when a stage trained its parts, detection only when
  a stage trained the detector with a contrastive term; ``only_trained`` (the ablations)
  leaves out the systems without trained parts and the most-popular baseline.
  ``timing['attack_<condition>_s']`` is the crafting time of each catalogue crafted in this
  call, and with ``cached_time`` (a training run) also of each one taken from the cache (its
  recorded crafting time: a run resumed after a kill reports what an uninterrupted one does,
  as the stages' seconds come from their records). ``detect``, ``fidelity``, ``mostpop``:
  False leaves out detection, the denoiser's fidelity, the most-popular baseline (the other
  recommenders of a run, :mod:`jaxvars.families`); None: as described above. ``baselines``:
  score the detection baselines (``config.detector.baselines``) beside the detector; None: unless
  ``only_trained`` (an ablation variant's would repeat the main run's: they read neither D nor g).

  Returns:
    (results: results.json's evaluation sections, artifacts: the arrays of artifacts.npz,
    per-user ranks under ``'ranks/<row>'`` among them). Nothing is written.
  """
  config = exp.config
  plan = plan_for(exp, consts, eval_eps=eval_eps, methods=methods, only_trained=only_trained)
  ctx = EvalContext(models=exp.models, params=params, consts=consts, data=exp.data,
                    mesh=exp.mesh, config=config, systems=evaluated_systems(
                        config, only_trained=only_trained),
                    eval_items=exp.eval_items, holdout=exp.holdout, calibration=exp.calibration,
                    cache_dir=attack_cache(config, exp.workdir) if cache_dir == -1 else cache_dir)
  out = evaluate_all(
      ctx, plan, detect=detector_trained(config) if detect is None else detect and
      detector_trained(config), fidelity=("denoiser" in trained_groups(config)) if fidelity is
      None else fidelity and "denoiser" in trained_groups(config),
      mostpop=(not only_trained) if mostpop is None else mostpop,
      baselines=(not only_trained) if baselines is None else baselines)
  artifacts = out.pop("artifacts")
  timing = dict(exp.timing, **out.pop("timing"))
  timing.update({f"attack_{k}_s": v["time_s"] for k, v in out["attack"].items()
                 if cached_time or not v.get("cached")})
  results = {"backbone": backbone_summary(config),
             "data": dict(exp.data.summary(), defense_holdout_items=int(len(exp.holdout)),
                          defense_eval_items=int(len(exp.eval_items)),
                          defense_train_items=int(len(exp.pool))),
             **out, "timing": timing}
  return results, artifacts
