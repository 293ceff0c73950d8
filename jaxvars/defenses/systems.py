"""Defended systems: named pipelines from a catalogue photo to what the backbone sees.

A system is a transform ``(models, params, images, keys) -> images`` in front of the
frozen backbone and the recommender. Evaluation ranks the catalogue as each system of
``config.systems.evaluate`` sees it, under every condition; the report labels its rows
with ``System.label``. A new defence is one module of :mod:`jaxvars.defenses` that
registers a :class:`System` here (and names it in ``config.systems.evaluate``).

Registered here: ``undefended`` (the plain recommender; its rows are named after the
recommender, e.g. ``vbpr/clean``), ``defended`` (OURS: D(x), paper 3.3),
``defended_rand`` (OURS-rand: rand(D(x)) as the paper, or D(rand(x)) with
``config.denoiser.rand_order='before'``; padding ``config.denoiser.rand_pad``) and
``defended_rand_border`` (the same with border-colour padding) and ``defended_gated``
(OURS-gated: D only on the photos the detector flags, the others as uploaded).

**Sweeps.** A system with a :class:`Sweep` (``jpeg``, ``bit_depth``) reads one setting of
``config.systems`` that is either an int (one system, its registered name: ``jpeg``) or a
tuple of ints (one system per value, an *instance* named ``<system>_<tag><value><suffix>``:
``jpeg_q90``, ``bit_depth_3bit``). :meth:`SystemRegistry.expand` turns the registered names
of ``config.systems.evaluate`` into the evaluated ones; :meth:`SystemRegistry.get` resolves
an instance name to a :class:`System` bound to its value, whatever the config holds.

A transform is ``(models, params, images, keys, consts=None) -> images``: float32 images
[B, H, W, 3] in [0, 1]; ``consts`` the frozen backbone's constants, with the deployed
detector threshold under :data:`GATE_THRESHOLD` where the evaluation has calibrated one. A
randomised system's transform takes keys [K, B] (K draws of each of B photos) and returns
[K, B, H, W, 3]; the others take ``keys=None`` and return [B, H, W, 3].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from jaxvars.defenses.detector import detection_score
from jaxvars.errors import ConfigError
from jaxvars.registry import Registry
UNDEFENDED = "undefended"
# consts key of the deployed detector threshold (set by the evaluation from the clean
# calibration items' scores at config.detector.fpr), read by the gated system.
GATE_THRESHOLD = "detector_threshold"

Transform = Callable[..., jax.Array]  # (models, params, images [B,H,W,3], keys | None, consts)


@dataclasses.dataclass(frozen=True)
class System:
  """One registered pipeline.

  Attributes:
    label: the name in tables ('OURS-rand'); None = the recommender's label.
    make: ``config -> Transform``: binds the system's settings (e.g. a JPEG quality).
    needs: parameter groups a defence stage must have trained (else it is not evaluated).
    randomized: draws randomness per item (its transform gets one PRNG key per image).
    description: one line for the report: what the backbone sees.
    settings: ``config -> dict`` of the settings it runs with (recorded in results.json).
    validate: ``config -> None``, raising ConfigError for a bad setting of its own.
    gated: reads the deployed detector threshold (``consts[GATE_THRESHOLD]``).
    host_callback: runs host (Python) code inside the jitted program (``jax.pure_callback``).
      Such programs run one batch at a time (``features.batched_map``): two at once on a
      CPU can park both callbacks on XLA's thread pool, each waiting for the pool, and hang
      (seen on H&M with JPEG's codec, 2 cores).
  """
  label: str | None
  make: Callable[..., Transform]
  needs: tuple[str, ...] = ()
  randomized: bool = False
  description: str = ""
  settings: Callable[..., dict] = lambda config: {}
  validate: Callable[..., None] = lambda config: None
  gated: bool = False
  host_callback: bool = False
  sweep: Sweep | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The one setting of a system that ``config.systems`` may sweep (AIP, Liu & Larson 2021,
  section 7.2: JPEG quality 90..10, bit depth 7..3, one row each).

  Attributes:
    field: its field of ``config.systems`` ('jpeg_quality'): an int (one system, the registered
      name, as before sweeps existed) or a tuple / list of ints (one instance per value).
    tag, suffix: an instance's name is ``f'{system}_{tag}{value}{suffix}'`` ('jpeg_q90',
      'bit_depth_3bit').
    label: its label, ``label.format(value)`` ('JPEG q90').
    at: ``value -> Transform``: the transform at one setting.
    low, high: the allowed values, inclusive.
  """
  field: str
  tag: str
  suffix: str
  label: str
  at: Callable[[int], Transform]
  low: int
  high: int

  def ok(self, value) -> bool:
    """Whether ``value`` is an allowed setting (an int, not a bool, in [low, high])."""
    return not isinstance(value, bool) and isinstance(value, int) and self.low <= value <= self.high

  def values(self, config) -> tuple[int, ...] | None:
    """The swept values of ``config.systems.<field>``, or None where it holds one int."""
    value = config.systems.get(self.field)
    return tuple(value) if isinstance(value, (tuple, list)) else None

  def single(self, config, system: str) -> int:
    """The one value of ``config.systems.<field>`` (``system``: the registered name, for the
    message).

    Raises:
      ConfigError: it holds a sweep (each value is its own system: name one).
    """
    value = config.systems.get(self.field)
    if isinstance(value, (tuple, list)):
      names = ", ".join(repr(f"{system}_{self.tag}{v}{self.suffix}") for v in value)
      raise ConfigError(f"config.systems.{self.field}={tuple(value)!r} is a sweep: each value is "
                        f"its own system ({names}); '{system}' alone names none of them")
    return int(value)

  def validate(self, config) -> None:
    """Raises ConfigError naming the field unless it holds an allowed int or a non-empty
    tuple / list of distinct allowed ints."""
    value = config.systems.get(self.field)
    if isinstance(value, (tuple, list)):
      if not value or not all(self.ok(v) for v in value) or len(set(value)) != len(value):
        raise ConfigError(f"config.systems.{self.field}={tuple(value)!r} must be an integer in "
                          f"[{self.low}, {self.high}] or a non-empty tuple of distinct such "
                          "integers (a sweep: one system per value)")
    elif not self.ok(value):
      raise ConfigError(f"config.systems.{self.field}={value!r} must be an integer in "
                        f"[{self.low}, {self.high}] (or a tuple of them: a sweep)")


class SystemRegistry(Registry):
  """The registry of defended systems, which also resolves the instance names of swept
  systems (:class:`Sweep`): ``get('jpeg_q90')`` is ``jpeg`` at quality 90."""

  def __init__(self, kind: str):
    super().__init__(kind)
    self._instances: dict[str, tuple[str, System]] = {}  # name -> (registered name, System)

  def _instance(self, name: str) -> System | None:
    """The System of instance ``name`` (cached, so one name gives one object), or None."""
    if name in self._instances:
      return self._instances[name][1]
    for base, entry in self._entries.items():
      sw = entry.sweep
      if sw is None:
        continue
      m = re.fullmatch(re.escape(f"{base}_{sw.tag}") + r"([0-9]+)" + re.escape(sw.suffix), name)
      if m is None or str(int(m.group(1))) != m.group(1) or not sw.ok(int(m.group(1))):
        continue
      value = int(m.group(1))
      system = dataclasses.replace(
          entry, label=sw.label.format(value), make=lambda config, sw=sw, v=value: sw.at(v),
          description=f"{entry.description} (this row: {sw.field}={value})",
          settings=lambda config, f=sw.field, v=value: {f: v},
          validate=lambda config: None, sweep=None)
      self._instances[name] = (base, system)
      return system
    return None

  def check(self, value: str, field: str) -> None:
    """Raises ConfigError naming ``field`` unless ``value`` is a registered name or an
    instance name of a swept system (``jpeg_q50``)."""
    if value not in self._entries and self._instance(value) is None:
      swept = [f"'{n}_{e.sweep.tag}<{e.sweep.low}..{e.sweep.high}>{e.sweep.suffix}'"
               for n, e in self._entries.items() if e.sweep is not None]
      raise ConfigError(f"{field}={value!r} is not a known {self.kind}; expected one of "
                        f"{self.names()}" + (f" or a setting of a swept one ({', '.join(swept)})"
                                             if swept else ""))

  def get(self, name: str, field: str | None = None) -> System:
    """The System of a registered name or of an instance name (see :class:`Sweep`).

    Raises:
      ConfigError: an unknown name (naming ``field`` when given).
    """
    self.check(name, field or f"{self.kind} name")
    return self._entries[name] if name in self._entries else self._instance(name)

  def __contains__(self, name: str) -> bool:
    return name in self._entries or self._instance(name) is not None

  def instance_name(self, base: str, value: int) -> str:
    """The instance name of registered system ``base`` at ``value`` ('jpeg', 90 -> 'jpeg_q90')."""
    sw = self._entries[base].sweep
    return f"{base}_{sw.tag}{int(value)}{sw.suffix}"

  def expand(self, config, names: Iterable[str]) -> tuple[str, ...]:
    """The systems ``names`` (``config.systems.evaluate``) stand for under ``config``: a swept
    system whose setting holds a tuple becomes one instance per value, in the tuple's order
    ('jpeg' with ``jpeg_quality=(90, 50)`` -> 'jpeg_q90', 'jpeg_q50'); every other name (an
    int setting included) stays as it is. Duplicates are dropped, the first kept."""
    out = []
    for name in names:
      entry = self._entries.get(name)
      values = entry.sweep.values(config) if entry is not None and entry.sweep else None
      out += [name] if values is None else [self.instance_name(name, v) for v in values]
    return tuple(dict.fromkeys(out))

  def swept(self, config, name: str) -> bool:
    """Whether registered system ``name`` is swept under ``config`` (its setting a tuple)."""
    entry = self._entries.get(name)
    return bool(entry is not None and entry.sweep and entry.sweep.values(config) is not None)

  def base_of(self, name: str) -> str:
    """The registered name of a system ('jpeg_q90' -> 'jpeg'; a registered name -> itself).

    Raises:
      ConfigError: an unknown name.
    """
    if name in self._entries:
      return name
    self.check(name, f"{self.kind} name")
    return self._instances[name][0]


SYSTEMS = SystemRegistry("defended system")


def draw_keys(items: jax.Array, base: jax.Array, *, draws: int) -> jax.Array:
  """PRNG keys [draws, B] of a randomised system's transform of ``items`` [B]: draw d of
  item i is ``fold_in(fold_in(base, i), d)``, whatever the batch it is in."""
  per_item = jax.vmap(lambda i: jax.random.fold_in(base, i))(items)
  return jax.vmap(lambda d: jax.vmap(lambda k: jax.random.fold_in(k, d))(per_item))(
      jnp.arange(draws))


def row_name(system: str, recommender_name: str) -> str:
  """The name of a system's rows in results.json (the recommender's for ``undefended``)."""
  return recommender_name if system == UNDEFENDED else system


def _undefended(models, params, images, keys, consts=None):
  return images


def _defended(models, params, images, keys, consts=None):
  return models.denoise(params, images)


def gated_denoise(models, params, consts, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """OURS-gated: D(x) where the detector flags x (score ||z(x) - z(D(x))|| above the deployed
  threshold), x itself elsewhere.

  Args:
    models, params: the composed models and their parameters (denoiser, detector).
    consts: the backbone's constants with the threshold under :data:`GATE_THRESHOLD`.
    images: float32 [B, H, W, 3] in [0, 1].

  Returns:
    (images float32 [B, H, W, 3], flagged bool [B]). The gate itself has no gradient: a
    white-box attacker differentiates through the branch each photo takes (and evades the
    gate with the detector-aware penalty, :mod:`jaxvars.attacks.whitebox`).

  Raises:
    ValueError: ``consts`` without a threshold (only an evaluation that calibrated the
      detector can run this system).
  """
  if consts is None or GATE_THRESHOLD not in consts:
    raise ValueError(f"the gated system needs the deployed detector threshold in "
                     f"consts[{GATE_THRESHOLD!r}] (set by the evaluation from the calibration "
                     f"items)")
  denoised = models.denoise(params, images)
  z = models.embed(params, consts, jnp.concatenate([images, denoised]))
  b = images.shape[0]
  flagged = detection_score(z[:b], z[b:]) > consts[GATE_THRESHOLD]
  return jnp.where(flagged[:, None, None, None], denoised, images), flagged


def _gated(models, params, images, keys, consts=None):
  return gated_denoise(models, params, consts, images)[0]


def make_rand_system(config, *, pad: str | None = None) -> Transform:
  """The transform of OURS-rand: rand(D(x)) or D(rand(x)) (``config.denoiser.rand_order``),
  K draws per photo, padding ``pad`` (default ``config.denoiser.rand_pad``)."""
  order = config.denoiser.get("rand_order", "after")
  pad = pad or config.denoiser.rand_pad

  def transform(models, params, images, keys, consts=None):
    if order == "after":  # D once, then K random resize + pads of its output.
      denoised = models.denoise(params, images)
      return jax.vmap(lambda ks: models.rand(denoised, ks, pad=pad))(keys)
    return jax.vmap(lambda ks: models.denoise(params, models.rand(images, ks, pad=pad)))(keys)

  return transform


SYSTEMS.register(UNDEFENDED, System(label=None, make=lambda config: _undefended,
                                    description="the recommender on the photos as uploaded"))
SYSTEMS.register("defended", System(label="OURS", make=lambda config: _defended,
                                    needs=("denoiser",),
                                    description="denoiser D in front of the frozen backbone"))
SYSTEMS.register("defended_rand", System(
    label="OURS-rand", make=make_rand_system, needs=("denoiser",), randomized=True,
    description="D and a random resize + pad (Xie et al. 2018), in config.denoiser.rand_order",
    settings=lambda config: {"rand_order": config.denoiser.get("rand_order", "after"),
                             "rand_pad": config.denoiser.rand_pad,
                             "rand_min_scale": config.denoiser.rand_min_scale}))
SYSTEMS.register("defended_rand_border", System(
    label="OURS-rand-border", make=lambda config: make_rand_system(config, pad="border"),
    needs=("denoiser",), randomized=True,
    description="OURS-rand padding with the photo's border colour instead of black",
    settings=lambda config: {"rand_order": config.denoiser.get("rand_order", "after"),
                             "rand_pad": "border",
                             "rand_min_scale": config.denoiser.rand_min_scale}))
SYSTEMS.register("defended_gated", System(
    label="OURS-gated", make=lambda config: _gated, needs=("denoiser", "detector"),
    gated=True,
    description="D only on the photos the detector flags at the deployed threshold (the others "
                "as uploaded), so clean photos mostly reach the backbone unchanged",
    settings=lambda config: {"detector_fpr": float(config.detector.fpr)}))
