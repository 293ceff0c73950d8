"""A locked workdir, race-safe dataset preparation and safe paths (issue 33, items 2 and 3):
a second run on a workdir stops at once naming the holder; a lock left by a killed run is
taken over; two first preparations of one table at once both succeed with the same table;
a symlink planted at a temporary file's name is never written through; an item id naming a
photo outside the dataset folder is refused by name."""

import csv
import hashlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_env
from test_data import folder_config, write_folder_dataset
from jaxvars import atomic
from jaxvars.data import pipeline
from jaxvars.errors import ConfigError, DataError, JaxvarsError

# A process that holds a workdir's lock until killed (printing 'locked' once it has it).
_HOLDER = """
import sys, time
from jaxvars import locking
held = locking.lock_run(sys.argv[1], None, mode="train")
print("locked", flush=True)
time.sleep(120)
"""


def _hold(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=cli_env())
  line = proc.stdout.readline()
  if line.strip() != "locked":
    proc.kill()
    pytest.fail(f"the holder did not take the lock: {line!r} {proc.stderr.read()[-2000:]}")
  return proc


def _stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.wait(timeout=30)


# ---- The workdir lock -----------------------------------------------------------------

def test_second_run_on_a_locked_workdir_is_refused_naming_pid_and_host(tmp_path):
  from jaxvars import locking
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  try:
    with pytest.raises(locking.WorkdirLockedError) as info:
      locking.lock_run(str(workdir), None, mode="train")
    message = str(info.value)
    assert isinstance(info.value, JaxvarsError) and "\n" not in message
    assert f"--workdir={workdir} is in use by another jaxvars run" in message
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    # Report and evaluate modes write into the workdir too.
    for mode in ("evaluate", "report"):
      with pytest.raises(locking.WorkdirLockedError, match=f"pid {holder.pid} "):
        locking.lock_run(str(workdir), None, mode=mode)
  finally:
    _stop(holder, signal.SIGTERM)


def test_second_run_through_the_command_line_exits_2_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  try:
    r = subprocess.run([sys.executable, "-m", "jaxvars.main", "--config=configs/joint.py:tiny",
                        f"--workdir={workdir}", f"--config.data.tfds_dir={tmp_path}/tfds"],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
  finally:
    _stop(holder, signal.SIGTERM)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("jaxvars: error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr
  assert f"pid {holder.pid} on host {socket.gethostname()}" in errors[0]
  assert f"--workdir={workdir} is in use" in errors[0]
  assert not (tmp_path / "tfds").exists()  # Stopped before any work.
  assert sorted(os.listdir(workdir)) == [".jaxvars.lock"]  # The holder's, left by SIGTERM.


def test_report_command_waits_for_no_run_it_would_race(tmp_path):
  """``python -m jaxvars.report`` rewrites report.md: refused while a run holds the workdir."""
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  try:
    r = subprocess.run([sys.executable, "-m", "jaxvars.report", f"--workdir={workdir}"],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
  finally:
    _stop(holder, signal.SIGTERM)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert f"pid {holder.pid} on host {socket.gethostname()}" in r.stderr
  assert not (workdir / "report.md").exists()


def test_stale_lock_of_a_killed_run_is_taken_over_and_removed_at_the_end(tmp_path, caplog):
  from jaxvars import locking
  workdir = tmp_path / "run"
  holder = _hold(workdir)
  _stop(holder)  # kill -9: the OS releases its flock; the file stays.
  lock_file = workdir / locking.LOCK_FILE
  assert json.loads(lock_file.read_text())["pid"] == holder.pid
  caplog.set_level("INFO")
  held = locking.lock_run(str(workdir), None, mode="train")
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert f"taking over the lock of a run that has stopped (pid {holder.pid}" in caplog.text
  # While held, a second taker in this process (another FileLock) is refused too.
  with pytest.raises(locking.WorkdirLockedError, match=f"pid {os.getpid()} "):
    locking.lock_workdir(str(workdir))
  held.release()
  assert not lock_file.exists()
  locking.lock_run(str(workdir), None, mode="train").release()  # Free again.


def test_ablation_sub_workdirs_are_locked_with_their_workdir(tmp_path):
  from jaxvars import locking
  config = ml_collections.ConfigDict({"ablation": {"variants": {"no_detector": ("a=1",)},
                                                   "extra": "late:b=2"}})
  workdir = tmp_path / "run"
  sub = workdir / "ablations" / "no_detector"
  holder = _hold(sub)  # A run started on the sub-workdir separately.
  try:
    with pytest.raises(locking.WorkdirLockedError, match=re.escape(
        f"ablation sub-workdir={sub} is in use by another jaxvars run (pid {holder.pid} ")):
      locking.lock_run(str(workdir), config, mode="train")
    assert not (workdir / locking.LOCK_FILE).exists()  # Released again.
  finally:
    _stop(holder)
  held = locking.lock_run(str(workdir), config, mode="train")
  try:
    for name in ("no_detector", "late"):
      with pytest.raises(locking.WorkdirLockedError, match=f"pid {os.getpid()} "):
        locking.lock_workdir(str(workdir / "ablations" / name))
  finally:
    held.release()
  assert not list(workdir.rglob(locking.LOCK_FILE))


def test_symlink_at_the_lock_file_is_refused_not_written_through(tmp_path):
  from jaxvars import locking
  outside = tmp_path / "outside.txt"
  outside.write_text("precious")
  workdir = tmp_path / "run"
  workdir.mkdir()
  os.symlink(outside, workdir / locking.LOCK_FILE)
  with pytest.raises(ConfigError, match=r"\.jaxvars\.lock is a symbolic link"):
    locking.lock_run(str(workdir), None, mode="train")
  assert outside.read_text() == "precious"


# ---- Temporary files ---------------------------------------------------------------------

def _plant(path: pathlib.Path, outside: pathlib.Path) -> list:
  """Symlinks to ``outside`` at every temporary name the old code used for ``path``."""
  planted = []
  for suffix in ("", ".npz", ".npy", ".png", ".safetensors"):
    link = pathlib.Path(f"{path}.tmp{suffix}")
    os.symlink(outside, link)
    planted.append(link)
  return planted


@pytest.mark.parametrize("writer", ["json", "text", "npz", "npy", "path"])
def test_symlink_planted_at_a_temporary_name_is_not_written_through(tmp_path, writer):
  outside = tmp_path / "outside" / "secret.txt"
  outside.parent.mkdir()
  outside.write_text("precious")
  workdir = tmp_path / "run"
  workdir.mkdir()
  target = workdir / {"json": "results.json", "text": "report.md", "npz": "artifacts.npz",
                      "npy": "pgd@8.npy", "path": "fig.png"}[writer]
  planted = _plant(target, outside)
  if writer == "json":
    atomic.write_json(str(target), {"a": np.int64(1)})
    assert json.loads(target.read_text()) == {"a": 1}
  elif writer == "text":
    atomic.write_text(str(target), "hello")
    assert target.read_text() == "hello"
  elif writer == "npz":
    atomic.write_npz(str(target), {"x": np.arange(3)})
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))
  elif writer == "npy":
    atomic.write_npy(str(target), np.arange(4))
    np.testing.assert_array_equal(np.load(target, mmap_mode="r"), np.arange(4))
  else:
    with atomic.atomic_path(str(target), ".png") as tmp, open(tmp, "w") as f:
      f.write("figure")
    assert target.read_text() == "figure"
  assert outside.read_text() == "precious"
  assert not target.is_symlink()
  assert all(p.is_symlink() for p in planted)  # Left alone; nothing else is left behind.
  assert sorted(os.listdir(workdir)) == sorted([target.name] + [p.name for p in planted])
  assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_temporary_file_replaced_by_a_link_is_not_installed(tmp_path):
  outside = tmp_path / "secret.txt"
  outside.write_text("precious")
  target = tmp_path / "fig.png"
  with pytest.raises(atomic.UnsafeFileError, match="was replaced while it was written"):
    with atomic.atomic_path(str(target)) as tmp:
      os.remove(tmp)
      os.symlink(outside, tmp)
  assert not target.exists() and not os.path.lexists(tmp)
  assert outside.read_text() == "precious"


def test_split_is_not_written_through_a_planted_symlink(tmp_path):
  write_folder_dataset(tmp_path / "ds")
  outside = tmp_path / "secret.txt"
  outside.write_text("precious")
  workdir = tmp_path / "run"
  workdir.mkdir()
  planted = _plant(workdir / pipeline.SPLIT_FILE, outside)
  pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data, str(workdir))
  assert outside.read_text() == "precious"
  assert not (workdir / pipeline.SPLIT_FILE).is_symlink()
  assert "train_users" in np.load(workdir / pipeline.SPLIT_FILE).files
  assert all(p.is_symlink() for p in planted)


# ---- Item ids that name files outside the dataset folder -------------------------------

def _photo(path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(path)


def _append_interaction(csv_path: pathlib.Path, row: dict) -> int:
  """Appends ``row`` to a CSV file; returns its line number."""
  with open(csv_path) as f:
    lines = f.read().splitlines()
  with open(csv_path, "a", newline="") as f:
    header = lines[0].split(",")
    csv.DictWriter(f, fieldnames=header).writerow({k: row.get(k, "") for k in header})
  return len(lines) + 1


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_folder_item_id_outside_the_dataset_folder_is_refused_by_name(tmp_path, kind):
  root = tmp_path / "data" / "ds"
  write_folder_dataset(root)
  secret = tmp_path / "outside" / "secret"
  _photo(secret.with_suffix(".png"))  # A readable photo: today's code reads it silently.
  if kind == "symlink":
    item = "it999"
    os.symlink(secret.with_suffix(".png"), root / "images" / "it999.png")
  else:
    item = "../../../outside/secret" if kind == "dotdot" else str(secret)
  line = _append_interaction(root / "interactions.csv",
                             {"user_id": "u0", "item_id": item, "timestamp": "2020-01-07"})
  want = (f"{root}/interactions.csv:{line}: item_id '{item}' names a photo outside the dataset "
          "folder")
  with pytest.raises(DataError) as info:
    pipeline.load(folder_config(root, tmp_path / "tfds").data)
  message = str(info.value)
  assert message.startswith(want), message
  assert "\n" not in message and f"inside {root}/images" in message
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # Refused before any table.


def test_hm_article_id_outside_the_dataset_folder_is_refused_by_name(tmp_path):
  root = tmp_path / "hm"
  root.mkdir()
  articles = [f"01087750{k:02d}" for k in range(12)]
  with open(root / "transactions_train.csv", "w") as f:
    f.write("t_dat,customer_id,article_id,price\n")
    for u in range(4):
      for k in range(4):
        f.write(f"2020-01-{k + 1:02d},c{u},{articles[(u * 3 + k) % 12]},0.01\n")
    f.write("2020-01-05,c0,../etc/secret,0.01\n")
  for a in articles:
    _photo(root / "images" / a[:3] / f"{a}.jpg")
  _photo(tmp_path / "etc" / "secret.jpg")
  config = folder_config(root, tmp_path / "tfds")
  config.data.name = "hm"
  with pytest.raises(DataError, match=(
      rf"^{re.escape(str(root))}/transactions_train\.csv:18: article_id '\.\./etc/secret' names a "
      r"photo outside the dataset folder \(it leads to ")):
    pipeline.load(config.data)


def test_photos_inside_a_linked_images_folder_are_accepted(tmp_path):
  """A dataset whose images/ is a link to another disk is not refused."""
  real = tmp_path / "ds_real"
  write_folder_dataset(real)
  root = tmp_path / "ds"
  root.mkdir()
  for name in ("interactions.csv", "items.csv"):
    (root / name).write_bytes((real / name).read_bytes())
  os.symlink(real / "images", root / "images")
  d = pipeline.load(folder_config(root, tmp_path / "tfds").data)
  assert d.num_items > 0


# ---- Two first preparations of one table at once -----------------------------------------

_PREPARE = """
import hashlib, os, sys, time
sys.path.insert(0, "tests")
from test_data import folder_config
from jaxvars.data import pipeline
root, tfds_dir, go, ready = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):  # Start both preparations at the same moment.
  time.sleep(0.005)
d = pipeline.load(folder_config(root, tfds_dir).data)
digest = hashlib.sha256(d.images.tobytes() + "|".join(d.item_ids).encode()).hexdigest()
print("TABLE", d.num_items, d.num_users, digest, flush=True)
"""


def test_two_first_preparations_at_once_both_succeed_with_the_same_table(tmp_path):
  root, tfds_dir, go = tmp_path / "ds", tmp_path / "tfds", tmp_path / "go"
  write_folder_dataset(root)
  ready = [tmp_path / f"ready{k}" for k in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(root), str(tfds_dir), str(go),
                             str(r)], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in ready]
  deadline = time.monotonic() + 120
  while not all(r.exists() for r in ready):  # Both imported (tfds, jax) and waiting.
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.02)
  go.write_text("go")
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  tables = [next(l for l in out.splitlines() if l.startswith("TABLE")) for out, _ in outs]
  assert tables[0] == tables[1]
  assert len(list(tfds_dir.rglob("dataset_info.json"))) == 2  # Each table prepared once.
  assert not [p for p in tfds_dir.rglob("*") if "incomplete" in p.name or ".lock" in p.name]
  # And the same as a load of the prepared tables in this process.
  d = pipeline.load(folder_config(root, tfds_dir).data)
  digest = hashlib.sha256(d.images.tobytes() + "|".join(d.item_ids).encode()).hexdigest()
  assert tables[0].split()[-1] == digest
