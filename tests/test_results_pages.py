"""The measured-results pages (README.md, results/*.md) are regenerated from the JSON that runs
and benchmarks write (jaxvars.report.pages): the committed pages must equal what their JSON
gives, and the renderer must read the numbers it is given."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from jaxvars import provenance
from jaxvars.errors import JaxvarsError
from jaxvars.report import pages

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_committed_pages_equal_their_json():
  """Every generated block of README.md, results/*.md and docs/*.md is what its JSON gives
  now (run ``python -m jaxvars.report.pages`` after adding a run or a benchmark)."""
  assert pages.stale(str(REPO)) == []


def _row(value, lo, hi):
  return {"HR@10": value, "ci95": {"HR@10": [lo, hi]}}


def _results(seed, shift=0.0):
  return {
      "config": {"seed": seed, "presets": "cpu,hm"},
      "data": {"users": 887},
      "users": {"attacked": 262},
      "systems": {"vbpr": {"system": "undefended", "label": "VBPR"}},
      "ranking": {"vbpr/clean": _row(0.30 + shift, 0.27, 0.33),
                  "vbpr/pgd@8": _row(0.18 + shift, 0.15, 0.21),
                  "defended/clean": _row(0.26, 0.23, 0.29)},
      "ranking_attacked": {"defended/pgd-wb@8": _row(0.12, 0.08, 0.16),
                           "defended/pgd-wb-det1@8": _row(0.99, 0.9, 1.0),
                           "defended_rand/pgd-wb-eot4@8": _row(0.14 + shift, 0.10, 0.18)},
      "robust": {"defended": _row(0.02, 0.01, 0.04)},
      "detection": {"pgd@8": {"accuracy": 0.95, "ci95": {"accuracy": [0.94, 0.96]}}},
  }


def test_headline_of_one_seed_gives_the_run_interval_and_skips_variants():
  lines = pages.headline([_results(0)])
  text = "\n".join(lines)
  assert "| VBPR, clean photos | - | 0.300 [0.270, 0.330] |" in text
  # The white-box row is the plain attack, not its detector-aware variant.
  assert "| OURS, white-box PGD@8 through D | adaptive | 0.120 [0.080, 0.160] |" in text
  assert "OURS-rand, white-box PGD@8 + EOT 4" in text
  assert "| OURS, worst case over every attack | worst case | 0.020 [0.010, 0.040] |" in text
  assert "0.950 [0.940, 0.960]" in text
  assert "| VBPR, FGSM@8 | transfer (paper) | - |" in text  # Absent from the run.
  assert "262 users" in text and "887 test users" in text


def test_headline_over_seeds_is_the_mean_and_range():
  text = "\n".join(pages.headline([_results(0), _results(1, 0.02), _results(2, 0.04)]))
  # VBPR clean: 0.30, 0.32, 0.34 -> mean 0.32, range 0.30-0.34, half-width 0.03.
  assert "| VBPR, clean photos | - | 0.320 (seeds 0.300-0.340; one run's interval +-0.030) |" in text
  assert "Seeds [0, 1, 2]" in text


def test_benchmark_rows_become_a_table_with_their_provenance():
  result = {"provenance": {"code": "abc1234", "command": "python benchmarks/x.py",
                           "date": "2026-12-04T00:00:00Z", "cpu_count": 2, "jax": "0.10.2"},
            "rows": [{"program": "features", "workers": 1, "images_per_s": 340.61,
                      "same_output": True},
                     {"program": "features", "workers": 2, "images_per_s": 471.7,
                      "same_output": False}]}
  lines = pages.benchmark(result, "x.json")
  assert "`python benchmarks/x.py`" in lines[0] and "abc1234" in lines[0]
  assert "| program | workers | images_per_s | same_output |" in lines
  assert "| features | 1 | 340.6 | yes |" in lines
  assert "| features | 2 | 471.7 | **no** |" in lines
  with pytest.raises(JaxvarsError, match="no 'rows'"):
    pages.benchmark({"jax": "0.10"}, "y.json")


def test_blocks_are_rewritten_and_stale_pages_named(tmp_path):
  run = tmp_path / "results" / "runs" / "a" / "seed0"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps(_results(0)))
  page = tmp_path / "results" / "page.md"
  page.write_text("intro\n<!-- generated: headline runs=results/runs/a -->\nold\n"
                  "<!-- end generated -->\noutro\n")
  assert pages.stale(str(tmp_path)) == [str(page)]
  cmd = [sys.executable, "-m", "jaxvars.report.pages", f"--root={tmp_path}"]
  assert subprocess.run(cmd + ["--check"], capture_output=True).returncode == 1
  r = subprocess.run(cmd, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  text = page.read_text()
  assert text.startswith("intro\n") and text.endswith("<!-- end generated -->\noutro\n")
  assert "old" not in text and "0.300 [0.270, 0.330]" in text
  assert pages.stale(str(tmp_path)) == []
  page.write_text("<!-- generated: headline runs=results/runs/none -->\n<!-- end generated -->\n")
  r = subprocess.run(cmd, capture_output=True, text=True)
  assert r.returncode == 2 and "no <run>/results.json under results/runs/none" in r.stderr
  assert "Traceback" not in r.stderr


def test_provenance_names_the_command_and_the_code(monkeypatch):
  # The code version is the one read at import: a run that ends after a commit must not
  # record the new HEAD (describe() no longer asks git).
  monkeypatch.setattr(provenance, "code_version", lambda *a, **k: "moved-on")
  info = provenance.describe(["/x/benchmarks/peers.py", "--parts=a"])
  assert info["code"] == provenance.CODE_AT_IMPORT != "moved-on"
  assert info["command"].endswith("peers.py --parts=a")
  assert info["code"] != ""
  assert info["date"].endswith("Z")
