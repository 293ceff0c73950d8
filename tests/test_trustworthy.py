"""Trustworthy runs: no silent stale results, damaged files named, nothing lost on resume,
metrics a person can watch, and the manual's ablation command (issue 12).

The slow tests run the command-line program on the tiny preset: a changed setting on a
finished workdir, kill -9 at three points then resume, and the manual's own command.
"""

import json
import logging
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, cli_env, tiny_config

from jaxvars import checkpointing, run
from jaxvars.data import pipeline
from jaxvars.errors import ConfigError, DataError
from jaxvars.experiment import item_split
from jaxvars.metrics import MetricWriter, read_scalars
from jaxvars.progress import PlainProgress


def _snapshot(directory) -> dict:
  """{relative path: bytes} of every file under ``directory`` (to show nothing changed)."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


# ---- Checkpoints and split.npz ------------------------------------------------------------

def _damage_metadata(step_dir: pathlib.Path) -> None:
  for path in step_dir.rglob("_METADATA"):
    path.write_text("{not json")


def _damage_data(step_dir: pathlib.Path) -> None:
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 64
           and "METADATA" not in p.name]
  assert files, f"no data file under {step_dir}"
  for path in files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("damage", [_damage_metadata, _damage_data])
def test_corrupt_latest_checkpoint_falls_back_to_the_intact_step(tmp_path, damage, caplog):
  mgr = checkpointing.manager(str(tmp_path))
  old = {"w": jnp.arange(64.0), "b": jnp.ones(3)}
  checkpointing.save(mgr, 1, old)
  checkpointing.save(mgr, 2, {"w": jnp.arange(64.0) * 2, "b": jnp.zeros(3)})
  damage(tmp_path / "2")
  mgr = checkpointing.manager(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    step, tree = checkpointing.restore_latest(mgr, old)
  assert step == 1
  np.testing.assert_array_equal(tree["w"], old["w"])
  np.testing.assert_array_equal(tree["b"], old["b"])
  assert "checkpoint step 2" in caplog.text and "using step 1" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()


def test_truncated_split_is_named_and_left_alone(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  pipeline.load(config.data, workdir=str(tmp_path))
  path = tmp_path / "split.npz"
  path.write_bytes(path.read_bytes()[:500])
  before = _snapshot(tmp_path)
  with pytest.raises(DataError, match=re.escape(str(path)) + r" is damaged .*delete it and "
                     r"rerun to rebuild it"):
    pipeline.load(config.data, workdir=str(tmp_path))
  assert _snapshot(tmp_path) == before


def test_split_rebuilt_after_deletion_is_the_same(tfds_dir, tmp_path):
  """The message's advice (delete split.npz) is safe: the rebuilt split is identical."""
  config = tiny_config(tfds_dir)
  first = pipeline.load(config.data, workdir=str(tmp_path))
  os.remove(tmp_path / "split.npz")
  again = pipeline.load(config.data, workdir=str(tmp_path))
  for name in ("train_users", "train_items", "test_items", "eval_negatives"):
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))


# ---- Values checked before any work ---------------------------------------------------------

def test_capped_holdout_is_a_warning(tfds_dir, caplog):
  config = tiny_config(tfds_dir, **{"detector.holdout_items": 40})
  with caplog.at_level(logging.WARNING):
    _, holdout, _, _ = item_split(config, 100)
  assert len(holdout) == 25
  assert "config.detector.holdout_items=40 capped to 25" in caplog.text


def test_unwritable_workdir_is_named_before_any_work(tfds_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = blocker / "run"
  with pytest.raises(ConfigError, match=f"--workdir={re.escape(str(workdir))}: cannot write "
                     "there"):
    run.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  assert blocker.read_text() == "not a directory"


# ---- Metrics and progress --------------------------------------------------------------------

def test_metric_writer_round_trip(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.scalars("recommender", step, {"loss": 1.0 / step, "nan": float("nan"), "flag": True})
  writer.close()
  got = read_scalars(str(tmp_path))
  assert set(got) == {"recommender/loss"}  # Non-finite values and booleans are not scalars.
  assert got["recommender/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_plain_progress_lines_have_no_terminal_codes(caplog):
  bar = PlainProgress(range(5), desc="stage x", total=5, interval=0.0)
  with caplog.at_level(logging.INFO):
    for _ in bar:
      bar.set_postfix(loss=0.5)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage x")]
  assert lines[0].startswith("stage x: 1/5 (") and lines[-1].endswith("loss=0.5 (done)")
  assert not any("\r" in line or "\x1b" in line or "%|" in line for line in lines)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_run_writes_tensorboard_scalars(tiny_run):
  config, workdir, results = tiny_run
  got = read_scalars(workdir)
  epochs = [step for step, _ in got["recommender/loss"]]
  assert epochs == list(range(1, config.recommender.epochs + 1))
  # TensorBoard tags allow no '@': 'HR@10' is written 'HR_10', 'pgd@8' 'pgd_8'.
  assert {"denoiser_fgsm/loss", "eval/vbpr/clean/HR_10", "attack/pgd_8/images_per_s"} <= set(got)
  hr = dict(got["eval/vbpr/clean/HR_10"])[0]
  assert hr == pytest.approx(results["ranking"]["vbpr/clean"]["HR@10"])


# ---- The command-line program ---------------------------------------------------------------

# A small tiny run: two attacked catalogues, two defence stages (denoiser on FGSM, detector),
# no report.
SMALL = ["--config.systems.evaluate=('undefended', 'defended')", "--config.attack.eval_eps=(8,)",
         "--config.attack.adaptive.eps=()", "--config.targeted.num_targets=0",
         "--config.stages.denoiser_mix.epochs=0", "--config.stages.joint.epochs=0",
         "--config.eval.report=False"]


def _env():
  return cli_env()


def _main(workdir, *extra, preset="tiny"):
  return [sys.executable, "-m", "jaxvars.main", f"--config=configs/joint.py:{preset}",
          f"--workdir={workdir}", f"--config.data.tfds_dir={workdir.parent}/tfds", *extra]


@pytest.mark.slow
def test_changed_setting_stops_then_retrains_exactly_the_changed_stages(tmp_path):
  workdir = tmp_path / "run"
  base = _main(workdir, preset="tiny,vbpr")
  r = subprocess.run(base, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  first = json.loads((workdir / "results.json").read_text())
  before = _snapshot(workdir)
  changed = base + ["--config.recommender.lr=0.05"]
  r = subprocess.run(changed, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "holds stages trained with other settings" in r.stderr
  assert f"config.recommender.lr: {first['config']['recommender']['lr']!r} -> 0.05" in r.stderr
  assert "--config.resume=retrain_changed" in r.stderr
  assert _snapshot(workdir) == before  # Nothing was written: no stale results, no lost ones.
  r = subprocess.run(changed + ["--config.resume=retrain_changed"], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "retraining stage recommender" in r.stderr
  again = json.loads((workdir / "results.json").read_text())
  assert again["config"]["recommender"]["lr"] == 0.05
  history = again["training"]["recommender"]["history"]
  assert [row["epoch"] for row in history] == list(range(1, first["config"]["recommender"]
                                                           ["epochs"] + 1))
  assert history != first["training"]["recommender"]["history"]


def _run_until(cmd, cwd, trigger, what, timeout=600):
  """Starts ``cmd`` and kill -9s it as soon as ``trigger(stderr_so_far)`` is true.

  Returns the stderr read until then. Fails if the process ends first.
  """
  proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  seen, start = [], time.time()
  fd = proc.stderr.fileno()
  os.set_blocking(fd, False)
  try:
    while time.time() - start < timeout:
      try:
        chunk = os.read(fd, 1 << 16)
      except BlockingIOError:  # Nothing written since the last read.
        chunk = b""
      if chunk:
        seen.append(chunk.decode("utf-8", errors="replace"))
      if trigger("".join(seen)):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "".join(seen)
      if proc.poll() is not None:
        pytest.fail(f"the run ended before {what}: {''.join(seen)[-3000:]}")
      time.sleep(0.05)
    pytest.fail(f"{what} not reached in {timeout} s")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_kill_9_at_three_points_then_resume_equals_an_uninterrupted_run(tmp_path):
  """kill -9 in VBPR's training, in a defence stage and between attacked catalogues (one
  resumed run after another), then a last run: its rankings, detection, histories and
  timing keys equal those of a run never interrupted."""
  clean = tmp_path / "clean" / "run"
  r = subprocess.run(_main(clean, *SMALL), cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  want = json.loads((clean / "results.json").read_text())

  workdir = tmp_path / "killed" / "run"
  cmd = _main(workdir, *SMALL)
  _run_until(cmd, REPO, lambda log: "recommender epoch 3/4" in log, "VBPR's epoch 3")
  assert not (workdir / "results.json").exists()
  log = _run_until(cmd, REPO, lambda log: "stage detector epoch" in log, "a defence stage")
  assert "recommender: resuming from checkpoint" in log
  attacks = workdir / "attacks"
  _run_until(cmd, REPO, lambda log: attacks.is_dir() and any(attacks.glob("*.json")),
             "the first attacked catalogue")
  assert len(list(attacks.glob("*.json"))) < 2  # Killed between the two catalogues.
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads((workdir / "results.json").read_text())
  assert got["ranking"] == want["ranking"]
  assert got["detection"] == want["detection"]
  assert got["training"] == _with_same_seconds(want["training"], got["training"])
  assert set(got["timing"]) == set(want["timing"])


def _with_same_seconds(want, got):
  """``want`` with every 'seconds'/'*_s' number replaced by ``got``'s (wall time differs)."""
  if isinstance(want, dict):
    return {k: (got[k] if (k == "seconds" or k.endswith("_s")) and k in got
                else _with_same_seconds(v, got.get(k) if isinstance(got, dict) else None))
            for k, v in want.items()}
  if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
    return [_with_same_seconds(a, b) for a, b in zip(want, got)]
  return want


def _readme_command(marker: str) -> list[str]:
  """The ``python -m jaxvars.main`` command line containing ``marker`` in README.md or the
  manual (docs/*.md)."""
  pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
  for page in pages:
    for line in page.read_text().splitlines():
      line = line.strip().strip("`")
      if line.startswith("python -m jaxvars.main") and marker in line:
        return shlex.split(line)
  raise AssertionError(f"README.md and docs/ have no `python -m jaxvars.main ... {marker}` command")


@pytest.mark.slow
def test_readme_ablation_command_at_tiny_size(tmp_path):
  """The manual's "add your own ablation" command (docs/running.md), with the preset swapped for tiny and the
  workdir for a temporary one."""
  args = _readme_command("ablation.extra=")
  workdir = tmp_path / "run"
  swapped = []
  for a in args[3:]:
    if a.startswith("--config="):
      a = "--config=configs/joint.py:tiny"
    elif a.startswith("--workdir="):
      a = f"--workdir={workdir}"
    swapped.append(a)
  extra = next(a for a in swapped if a.startswith("--config.ablation.extra="))
  names = [part.split(":", 1)[0] for part in extra.split("=", 1)[1].split("|")]
  cmd = [sys.executable, "-m", "jaxvars.main", *swapped, f"--config.data.tfds_dir={tmp_path}/tfds",
         *SMALL]
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert set(names) <= set(results["ablations"])
  for name in names:
    assert (workdir / "ablations" / name / "results.json").exists()
