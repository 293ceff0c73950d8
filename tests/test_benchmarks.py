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


# ---- benchmarks/accelerator.py (issue 36 item 7): CI has no accelerator, so it runs here on
# the CPU at its --small shapes, with a tiny ResNet-18 (width 8).

def test_accelerator_kinds_map_to_the_planners_peaks():
  from jaxvars import planner
  expected = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 SXM5 80GB": "h100",
              "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
              "NVIDIA A100 80GB PCIe": "a100", "TPU v4": "tpu_v4", "TPU v5 lite": "tpu_v5e",
              "TPU v5": "tpu_v5p", "TPU v5p": "tpu_v5p",
              # Not in the table (lower peaks than the SXM parts'), or not accelerators.
              "NVIDIA H100 PCIe": None, "NVIDIA H100 NVL": None, "NVIDIA H200 NVL": None,
              "cpu": None, "TPU v6 lite": None, "Tesla V100-SXM2-16GB": None}
  for kind, key in expected.items():
    assert planner.accelerator_for(kind) == key, kind
    assert key is None or key in planner.ACCELERATORS


@pytest.mark.slow
def test_accelerator_benchmark_at_small_shapes_on_cpu(tmp_path):
  """The script end to end in a child process: every requested row in both dtypes, with
  positive throughput and XLA FLOPs, MFU against --peak, and PGD's derived FLOPs (what
  accelerators report, where XLA counts the loop's body once) within 3% of XLA's count of
  the unrolled CPU program."""
  import json
  import subprocess
  import sys

  from conftest import cli_env
  out = tmp_path / "accelerator.json"
  env = cli_env()
  # Compilation is nearly all of this run: LLVM at -O0 halves it (FLOPs are XLA's HLO
  # counts, the same at any LLVM level).
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_backend_optimization_level")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0",
                                       "--xla_llvm_disable_expensive_passes=true"])
  root = pathlib.Path(__file__).resolve().parents[1]
  peak32, peak16 = 1e12, 2e12
  run = subprocess.run(
      [sys.executable, str(root / "benchmarks" / "accelerator.py"), "--small",
       "--backbones=resnet18", "--width=8", "--joint_kinds=fgsm", "--repeats=1",
       f"--peak={peak32},{peak16}", f"--out={out}"],
      cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["platform"] == "cpu" and result["device_kind"] and result["jax"]
  assert result["provenance"]["code"] and result["weights"] == "random"
  assert result["flags"]["image_size"] == 32 and result["flags"]["batch"] == 4
  rows = {(r["backbone"], r["dtype"], r["measure"]): r for r in result["rows"]}
  expected = {("resnet18", dtype, measure) for dtype in ("float32", "bfloat16")
              for measure in ("features", "fgsm", "pgd", "joint/fgsm")}
  assert set(rows) == expected
  for key, row in rows.items():
    assert row["per_s"] > 0 and row["seconds"] > 0 and row["flops"] > 0, key
    assert row["unit"] == ("items/s" if key[2].startswith("joint") else "images/s")
    assert row["per_s"] == pytest.approx(row["batch"] / row["seconds"])
    assert row["flop_per_s"] == pytest.approx(row["flops"] / row["seconds"])
    peak = peak16 if key[1] == "bfloat16" else peak32
    assert row["mfu"] == pytest.approx(row["flop_per_s"] / peak), key
  for dtype in ("float32", "bfloat16"):
    pgd = rows[("resnet18", dtype, "pgd")]
    assert pgd["pgd_steps"] == 2 and pgd["flops_source"] == "xla"  # Unrolled on a CPU.
    assert pgd["flops_derived"] == pytest.approx(pgd["flops_xla"], rel=0.03)
    assert pgd["flops"] > 2 * rows[("resnet18", dtype, "fgsm")]["flops"]
