"""Names of evaluation conditions and result rows, in one place.

A *condition* is what the catalogue's photos went through: ``'clean'``, or an attack at a
budget, ``'<attack>@<eps>'`` (eps in 1/255 units, ``%g``-formatted: ``'pgd@8'``). An attack
without an L-inf budget (C&W as published) is at :data:`UNBOUNDED`, ``'cw@255'``: 255/255
bounds nothing in [0, 1]. A result row of ``results.json['ranking']`` is
``'<system>/<condition>'``.
"""

from __future__ import annotations

CLEAN = "clean"
UNBOUNDED = 255.0  # The budget of an attack with no L-inf bound: the whole [0, 1] box.


def condition_key(attack: str, eps: float) -> str:
  """``('pgd', 8.0)`` -> ``'pgd@8'``."""
  return f"{attack}@{float(eps):g}"


def parse_condition(key: str) -> tuple[str, float | None]:
  """``'pgd@8'`` -> ``('pgd', 8.0)``; ``'clean'`` -> ``('clean', None)``."""
  if "@" not in key:
    return key, None
  attack, eps = key.rsplit("@", 1)
  return attack, float(eps)


def row_key(system: str, condition: str) -> str:
  """``('defended', 'pgd@8')`` -> ``'defended/pgd@8'``."""
  return f"{system}/{condition}"


def parse_row_key(key: str) -> tuple[str, str]:
  """``'defended/pgd@8'`` -> ``('defended', 'pgd@8')``."""
  system, _, condition = key.partition("/")
  return system, condition
