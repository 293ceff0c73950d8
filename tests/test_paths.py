"""Workdir and data paths through etils.epath (issue 36, item 3): jaxvars.fs.

A local path keeps the os calls; any other path (gs://, ...) goes through ``epath.Path``.
There is no GCS here, so the epath code paths run on a local disk: ``JAXVARS_EPATH_ALL=1``
makes :func:`jaxvars.fs.is_local` say False for every path, and etils' own
``epath.testing.mock_epath`` records which backend operations those paths made.
"""

import contextlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from jaxvars import atomic, fs, locking, workdir as wd
from conftest import tiny_config


@contextlib.contextmanager
def through_epath(monkeypatch):
  """Every path through the epath code paths (on the local disk), with the backend calls
  recorded: yields {operation: [path, ...]}."""
  monkeypatch.setenv(fs.EPATH_ALL_ENV, "1")
  calls: dict[str, list] = {}

  def record(name):
    def fn(original, path, *args, **kwargs):
      calls.setdefault(name, []).append(os.fspath(path))
      return original(path, *args, **kwargs)
    return fn

  ops = ("open", "exists", "isdir", "listdir", "makedirs", "remove", "replace", "rmtree",
         "stat", "walk")
  with epath_testing.mock_epath(**{op: record(op) for op in ops}):
    yield calls
  monkeypatch.delenv(fs.EPATH_ALL_ENV)


@pytest.fixture
def epath_all(monkeypatch):
  with through_epath(monkeypatch) as calls:
    yield calls


def _tree(root) -> dict[str, bytes]:
  """{relative path: bytes} of every file under ``root``."""
  out = {}
  for here, _, names in os.walk(root):
    for n in names:
      full = os.path.join(here, n)
      out[os.path.relpath(full, root)] = pathlib.Path(full).read_bytes()
  return out


def _write_all(workdir) -> None:
  """Every workdir writer once (into ``workdir``, created as a run creates it)."""
  fs.makedirs(workdir)
  wd.write_results(workdir, {"ranking": {"vbpr/clean": {"HR@10": np.float32(0.5)}},
                             "n": np.int64(3)})
  wd.write_artifacts(workdir, {"ranks/vbpr/clean": np.arange(5, dtype=np.int16)})
  wd.write_config(workdir, {"seed": 0, "data": {"name": "synthetic"}})
  atomic.write_npz(wd.split_path(workdir), {"a": np.arange(4)}, compressed=False)
  fs.makedirs(wd.attacks_dir(workdir))
  atomic.write_npy(fs.join(wd.attacks_dir(workdir), "pgd@8.npy"), np.ones((2, 3), np.uint8))
  with atomic.atomic_path(fs.join(workdir, "figure.png"), ".png") as tmp, open(tmp, "wb") as f:
    f.write(b"\x89PNG fake")
  from jaxvars.training import records
  records.save(wd.checkpoint_dir(workdir, "recommender"), fields={"seed": 0}, history=[],
               seconds=0.0, done=True, inputs={"split": "abc"})


def test_path_helpers_accept_str_pathlib_and_epath(tmp_path):
  for workdir in (str(tmp_path), tmp_path, epath.Path(tmp_path)):
    assert wd.results_path(workdir) == os.path.join(str(tmp_path), "results.json")
    assert wd.checkpoint_dir(workdir, "joint") == os.path.join(str(tmp_path), "checkpoints",
                                                               "joint")
  gcs = epath.Path("gs://bucket/run")
  assert wd.results_path(gcs) == "gs://bucket/run/results.json"
  assert wd.ablation_dir("gs://bucket/run", "x") == "gs://bucket/run/ablations/x"
  assert not fs.is_local(gcs) and fs.is_local(tmp_path)
  assert fs.abspath("gs://bucket/run") == "gs://bucket/run"  # Not made into /cwd/gs:/...


def test_writers_through_epath_write_the_same_bytes_as_through_os(tmp_path):
  local, remote = tmp_path / "local", tmp_path / "remote"
  _write_all(str(local))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fs.EPATH_ALL_ENV, "1")
    calls = {}
    with epath_testing.mock_epath(
        open=lambda orig, p, mode: calls.setdefault("open", []).append((os.fspath(p), mode))
        or orig(p, mode),
        replace=lambda orig, p, dst: calls.setdefault("replace", []).append(
            (os.fspath(p), os.fspath(dst))) or orig(p, dst)):
      _write_all(epath.Path(remote))
  assert _tree(local) == _tree(remote)
  # Every file was written to a temporary name through epath and renamed by epath.
  renamed = {os.path.relpath(dst, remote) for _, dst in calls["replace"]}
  assert renamed == set(_tree(remote))
  written = [p for p, mode in calls["open"] if "w" in mode]
  assert written and all(".tmp" in os.path.basename(p) for p in written)
  assert not [n for n in _tree(remote) if ".tmp" in n]


def test_readers_through_epath_read_what_os_wrote(tmp_path, monkeypatch):
  from jaxvars.report.writer import read_artifacts, read_results
  from jaxvars.training import records
  _write_all(str(tmp_path))  # Through os.
  with through_epath(monkeypatch) as calls:
    _read_all(tmp_path, read_results, read_artifacts, records)
  opened = {os.path.basename(p) for p in calls["open"]}
  assert {"results.json", "artifacts.npz", "split.npz", records.RECORD} <= opened


def _read_all(tmp_path, read_results, read_artifacts, records):
  assert records.read_split_fingerprint(wd.split_path(tmp_path)) is None  # No split arrays.
  assert read_results(wd.results_path(tmp_path))["n"] == 3
  np.testing.assert_array_equal(read_artifacts(wd.artifacts_path(tmp_path))["ranks/vbpr/clean"],
                                np.arange(5))
  assert records.load(wd.checkpoint_dir(tmp_path, "recommender"))["inputs"] == {"split": "abc"}
  assert read_results(wd.results_path(tmp_path / "absent")) is None
  assert read_artifacts(wd.artifacts_path(tmp_path / "absent")) == {}


class _Boom(RuntimeError):
  pass


@pytest.mark.parametrize("through_epath", [False, True])
def test_an_error_mid_write_leaves_no_file(tmp_path, monkeypatch, through_epath):
  if through_epath:
    monkeypatch.setenv(fs.EPATH_ALL_ENV, "1")
  target = tmp_path / "results.json"
  target.write_text('{"old": true}')

  class Bad:  # Serialises partly, then fails.
    pass

  def default(x):
    raise _Boom("mid-write")

  with pytest.raises(_Boom):
    with atomic.atomic_file(str(target), "w") as f:
      f.write('{"new": ')
      json.dump(Bad(), f, default=default)
  with pytest.raises(_Boom):
    with atomic.atomic_file(str(tmp_path / "artifacts.npz"), "wb") as f:
      f.write(b"PK\x03\x04 half a zip")
      raise _Boom("mid-write")
  with pytest.raises(_Boom):
    with atomic.atomic_path(str(tmp_path / "fig.png"), ".png") as tmp:
      pathlib.Path(tmp).write_bytes(b"half")
      raise _Boom("mid-write")
  assert target.read_text() == '{"old": true}'  # The old file is intact ...
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # ... and nothing else is left.


def test_lock_of_a_non_local_workdir_excludes_a_second_run_and_is_removed(tmp_path, epath_all):
  workdir = str(tmp_path / "run")
  held = locking.lock_run(workdir, None, mode="train")
  lock_file = os.path.join(workdir, wd.LOCK_FILE)
  info = json.loads(pathlib.Path(lock_file).read_text())
  assert info["pid"] == os.getpid() and info["token"]
  assert isinstance(held.locks[0], locking.ObjectLock)
  # Another live run's lock (here: a pid of this host that runs, as another process's
  # would be on another host) is refused, naming it.
  other = locking.ObjectLock(lock_file)
  assert not other.acquire(blocking=False)
  with pytest.raises(locking.WorkdirLockedError, match=r"pid \d+ on host"):
    locking.lock_run(workdir, None, mode="train")
  held.release()
  assert not os.path.exists(lock_file)
  # A lock left by a dead process of this host is taken over.
  pathlib.Path(lock_file).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname()[1],
                                                 "started": "then", "token": "old"}))
  with locking.lock_run(workdir, None, mode="train"):
    assert json.loads(pathlib.Path(lock_file).read_text())["token"] != "old"
  assert not os.path.exists(lock_file)
  # One of another host stays: the message names it and its file.
  pathlib.Path(lock_file).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
  with pytest.raises(locking.WorkdirLockedError, match="pid 1 on host elsewhere"):
    locking.lock_run(workdir, None, mode="train")
  assert pathlib.Path(lock_file).exists()
  assert epath_all.get("open")  # Written and read through epath.


def test_local_lock_is_still_a_flock(tmp_path):
  with locking.lock_run(epath.Path(tmp_path / "run"), None, mode="train") as held:
    assert isinstance(held.locks[0], locking.FileLock)
    with pytest.raises(locking.WorkdirLockedError):
      locking.lock_run(str(tmp_path / "run"), None, mode="train")


def _folder(root):
  from test_data import write_folder_dataset
  write_folder_dataset(root)
  return root


def test_data_dir_read_through_epath_gives_the_same_dataset(tmp_path, monkeypatch):
  """A folder dataset (CSV files, photos) and its split.npz, read and written through epath,
  equal the os path's: same fingerprints, arrays and split bytes."""
  from jaxvars.data import builders, pipeline
  root = _folder(tmp_path / "ds")
  datasets, splits = [], []
  for name, env in (("os", None), ("epath", "1")):
    if env:
      monkeypatch.setenv(fs.EPATH_ALL_ENV, env)
    config = tiny_config(tmp_path / f"tfds_{name}", **{"data.eval_negatives": 20})
    config.data.name = "folder"
    config.data.manual_dir = str(root)
    workdir = tmp_path / f"run_{name}"
    datasets.append((builders.source_files("folder", str(root))[0],
                     pipeline.load(config.data, workdir=str(workdir))))
    splits.append((workdir / "split.npz").read_bytes())
  (files_os, data_os), (files_ep, data_ep) = datasets
  assert files_os == files_ep
  np.testing.assert_array_equal(data_os.images, data_ep.images)
  np.testing.assert_array_equal(data_os.train_items, data_ep.train_items)
  assert splits[0] == splits[1]


def test_report_of_a_run_through_str_epath_and_the_epath_code_path(tiny_run, tmp_path,
                                                                   monkeypatch):
  """A finished tiny run's report written into a workdir given as a str, as an epath.Path,
  and through the epath code path: the same files, byte for byte (the header's workdir
  aside)."""
  from jaxvars.report import write_report
  _, source, _ = tiny_run
  trees = []
  for name in ("str", "epath", "epath_all"):
    workdir = tmp_path / name
    workdir.mkdir()
    for f in (wd.RESULTS_FILE, wd.ARTIFACTS_FILE):
      shutil.copy(os.path.join(source, f), workdir / f)
    if name == "epath_all":
      monkeypatch.setenv(fs.EPATH_ALL_ENV, "1")
    write_report(str(workdir) if name == "str" else epath.Path(workdir))
    tree = _tree(workdir)
    tree["report.md"] = tree["report.md"].replace(str(workdir).encode(), b"<workdir>")
    trees.append(tree)
  assert trees[0] == trees[1] == trees[2]
  assert any(n.startswith("figures" + os.sep) for n in trees[0])


def _run_files(workdir) -> set[str]:
  """The relative names of a run's files, without the names Orbax and TensorBoard make
  unique (a checkpoint step's data files, event files): a step is named by its directory."""
  out = set()
  for n in _tree(workdir):
    parts = n.split(os.sep)
    if parts[0] == "metrics":
      continue
    out.add(os.sep.join(parts[:3]) if parts[0] == wd.CHECKPOINTS_DIR else n)
  return out


def test_training_run_with_an_epath_workdir_writes_the_same_files(tfds_dir, tmp_path,
                                                                  monkeypatch):
  """A tiny training run (VBPR on clean photos only) whose workdir is a str, then one whose
  workdir is an epath.Path with every path on the epath code path: the same files; the
  same split, config, results (wall-clock fields aside) and artifacts."""
  from configs import joint
  from jaxvars import run
  runs = []
  for name in ("str", "epath"):
    config = joint.get_config("tiny,vbpr")
    config.data.tfds_dir = str(tfds_dir)
    config.eval.report = False
    config.recommender.epochs = 2
    config.eval.bootstrap_resamples = 20
    workdir = tmp_path / name
    if name == "epath":
      monkeypatch.setenv(fs.EPATH_ALL_ENV, "1")
      with locking.lock_run(epath.Path(workdir), config, mode="train") as held:
        assert isinstance(held.locks[0], locking.ObjectLock)
        run.train_and_evaluate(config, epath.Path(workdir))
      monkeypatch.delenv(fs.EPATH_ALL_ENV)
    else:
      with locking.lock_run(str(workdir), config, mode="train"):
        run.train_and_evaluate(config, str(workdir))
    runs.append(workdir)
  a, b = runs
  assert _run_files(a) == _run_files(b)
  assert not [n for n in _run_files(b) if ".tmp" in n or n == wd.LOCK_FILE]
  for f in (wd.SPLIT_FILE, wd.CONFIG_FILE):
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  results = [json.loads((w / wd.RESULTS_FILE).read_text()) for w in runs]
  for r in results:
    r.pop("provenance")
  assert run.without_timing(results[0]) == run.without_timing(results[1])
  with np.load(a / wd.ARTIFACTS_FILE) as za, np.load(b / wd.ARTIFACTS_FILE) as zb:
    assert za.files == zb.files
    for k in za.files:
      np.testing.assert_array_equal(za[k], zb[k], err_msg=k)


def test_gs_workdir_without_a_client_stops_naming_what_to_install():
  import importlib.util
  from jaxvars.errors import ConfigError
  if importlib.util.find_spec("gcsfs") or importlib.util.find_spec("tensorflow"):
    pytest.skip("a gs:// client is installed here")
  with pytest.raises(ConfigError, match=r"gs://b/run: gs:// paths need .*pip install gcsfs"):
    locking.lock_run("gs://b/run", None, mode="train")
  with pytest.raises(ConfigError, match=r"not ftp://"):
    fs.exists("ftp://host/x")


def test_weights_file_on_a_non_local_path_is_read_from_a_local_copy(tmp_path, monkeypatch):
  from jaxvars.backbones import weights
  source = tmp_path / "w.safetensors"
  weights.write_safetensors({"conv1.weight": np.ones((2, 3), np.float32)}, str(source))
  local_digest = weights.content_fingerprint(f"pretrained:{source}", "resnet18")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  with through_epath(monkeypatch) as calls:
    copy = weights.resolve_source(str(source), "resnet18")
    assert weights.content_fingerprint(f"pretrained:{source}", "resnet18") == local_digest
  assert copy.startswith(str(tmp_path / "cache" / "jaxvars" / "remote"))
  assert pathlib.Path(copy).read_bytes() == source.read_bytes()
  assert str(source) in calls["open"]  # Downloaded through epath.
