"""The benchmark scripts still match the library they measure.

They are not run by the suite (minutes each; results/performance.md), so a refactor that
renames a module or a function would otherwise break them silently (one did:
``benchmarks/throughput.py`` imported ``jaxvars.steps`` long after it was gone). Every
``from jaxvars... import name`` / ``from configs... import name`` / ``import jaxvars...`` of
every script must resolve, without running the script.
"""

import ast
import importlib
import pathlib

import pytest

BENCHMARKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
OURS = ("jaxvars", "configs")


def _our_imports(path: pathlib.Path) -> list[tuple[str, str | None, int]]:
  """(module, name or None, line) of each import of our packages in ``path``."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.split(".")[0] in OURS:
      out += [(node.module, alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.Import):
      out += [(alias.name, None, node.lineno) for alias in node.names
              if alias.name.split(".")[0] in OURS]
  return out


def test_there_are_benchmarks_that_import_the_library():
  assert len(BENCHMARKS) >= 5
  assert sum(bool(_our_imports(p)) for p in BENCHMARKS) >= 4


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
  for module, name, line in _our_imports(path):
    where = f"{path.name}:{line}"
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      pytest.fail(f"{where}: import {module} fails: {e}")
    if name is not None and not hasattr(mod, name):
      try:
        importlib.import_module(f"{module}.{name}")
      except ImportError:
        pytest.fail(f"{where}: {module} has no {name!r}")
