"""``'path.to.field=value'`` overrides of a config (the ablations' variants, Table 5)."""

from __future__ import annotations

import ast

import ml_collections

from jaxvars.errors import ConfigError


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


def without_ablations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with no ablation variants."""
  new = ml_collections.ConfigDict(config.to_dict())
  new.ablation.variants = ml_collections.ConfigDict()
  if "extra" in new.ablation:
    new.ablation.extra = ""
  return new


def ablation_variants(config) -> dict[str, tuple[str, ...]]:
  """{name: overrides} of ``config.ablation.variants`` and of ``config.ablation.extra``, the
  command-line form ``'name:path=value;path=value|name2:...'`` (the config is locked, so
  ``--config.ablation.variants.<new name>`` cannot add one).

  Raises:
    ConfigError: a malformed ``extra`` or a name given twice.
  """
  ablation = config.get("ablation")
  if ablation is None:
    return {}
  out = {name: tuple(v) if not isinstance(v, str) else v
         for name, v in ablation.get("variants", {}).items()}
  extra = str(ablation.get("extra", "") or "").strip()
  for part in (p.strip() for p in extra.split("|") if p.strip()):
    name, sep, rest = part.partition(":")
    name = name.strip()
    if not sep or not name.isidentifier() or not rest.strip():
      raise ConfigError(f"config.ablation.extra: {part!r} is not 'name:path=value[;path=value]'")
    if name in out:
      raise ConfigError(f"config.ablation.extra: variant {name!r} is defined twice")
    out[name] = tuple(o.strip() for o in rest.split(";") if o.strip())
  return out
