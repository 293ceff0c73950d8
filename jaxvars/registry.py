"""Named registries: the one mechanism by which backbones, recommenders, attack methods,
attack objectives and defended systems are added.

A component registers itself where it is defined (``@REGISTRY.register('name')``); the
package that owns a registry imports all of its submodules (:func:`import_submodules`), so
a new component is one new file, and config validation reads the allowed names from the
registry (:meth:`Registry.check`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

from jaxvars.errors import ConfigError


class Registry:
  """A name -> entry mapping of one kind of component.

  Args:
    kind: what the entries are, for messages ('backbone', 'attack objective', ...).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str, entry: Any = None) -> Callable[[Any], Any] | Any:
    """Registers ``entry`` under ``name``; without ``entry``, a decorator that does.

    Raises:
      ValueError: ``name`` is already registered.
    """
    def add(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = obj
      return obj
    return add if entry is None else add(entry)

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(self._entries)

  def check(self, value: str, field: str) -> None:
    """Raises ConfigError naming ``field`` unless ``value`` is a registered name."""
    if value not in self._entries:
      raise ConfigError(f"{field}={value!r} is not a known {self.kind}; expected one of "
                        f"{self.names()}")

  def get(self, name: str, field: str | None = None) -> Any:
    """The entry of ``name``.

    Raises:
      ConfigError: unknown name (naming ``field`` when given).
    """
    self.check(name, field or f"{self.kind} name")
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def items(self):
    return self._entries.items()


def import_submodules(package: str, path) -> None:
  """Imports every module of ``package`` (whose ``__path__`` is ``path``), so that their
  ``register`` calls run. Modules whose name starts with '_' are skipped."""
  for info in pkgutil.iter_modules(path):
    if not info.name.startswith("_"):
      importlib.import_module(f"{package}.{info.name}")
