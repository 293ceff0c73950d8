"""Issue 33, round 2 of bad inputs: each one stops with one message naming the file, field or
value and what was expected (a jaxvars.errors exception: the CLI prints it in one line and
exits 2), or is read with its right meaning instead of a silently wrong one."""

import errno
import glob
import json
import os
import shutil
import tracemalloc
import types

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from test_data import folder_config, write_folder_dataset
from jaxvars import atomic, configuration, run
from jaxvars.data import builders, images, pipeline
from jaxvars.data.images import load_image
from jaxvars.errors import (ConfigError, DataError, DiskFullError, DivergingLossError,
                            JaxvarsError)
from jaxvars.report import writer as report_writer
from jaxvars.training import records
from jaxvars.training.common import DIVERGENCE_FACTOR, check_finite


def _write_interactions(root, rows, header="user_id,item_id,timestamp"):
  (root / "interactions.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows))


# ---- Config values that crashed deep inside ----------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("seed", -1, r"config\.seed=-1 must be an integer seed in \[0, 2\*\*63 - 1\]"),
    ("seed", 2 ** 64, r"config\.seed=18446744073709551616 must be an integer seed"),
    ("data.split_seed", -1, r"config\.data\.split_seed=-1 must be an integer seed"),
    ("data.synthetic.seed", -3, r"config\.data\.synthetic\.seed=-3 must be an integer seed"),
    ("attack.seed", -1, r"config\.attack\.seed=-1 must be an integer seed"),
    ("data.min_user_interactions", 1, r"config\.data\.min_user_interactions=1 must be >= 2: "
     r"leave-one-out"),
    ("data.synthetic.num_items", 5, r"config\.data\.synthetic\.num_items=5 must be >= 106"),
])
def test_config_values_are_checked_before_any_work(field, value, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    configuration.validate(tiny_config(tmp_path, **{field: value}))


def test_too_few_synthetic_items_named_by_the_generator(tmp_path):
  """Without validate (the library API): the generator's error comes out of tfds unwrapped."""
  c = tiny_config(tmp_path / "tfds", **{"data.synthetic.num_items": 5})
  with pytest.raises(ConfigError, match=r"config\.data\.synthetic\.num_items=5 must be an "
                     r"integer >= 106"):
    pipeline.load(c.data)
  assert not glob.glob(str(tmp_path / "tfds" / "**" / "incomplete*"), recursive=True)


def test_user_with_one_item_is_named(tmp_path):
  root = tmp_path / "ds"
  write_folder_dataset(root)
  rows = (root / "interactions.csv").read_text().splitlines()
  (root / "interactions.csv").write_text("\n".join(rows + ["lonely,it1,2020-01-01"]) + "\n")
  c = folder_config(root, tmp_path / "tfds", **{"data.min_user_interactions": 1})
  with pytest.raises(ConfigError, match=r"config\.data\.min_user_interactions=1 keeps user "
                     r"'lonely' with 1 distinct item; leave-one-out .* needs >= 2"):
    pipeline.load(c.data)


# ---- CSV files ----------------------------------------------------------------------------

def test_timestamp_outside_int64_is_named(tmp_path):
  root = tmp_path / "ds"
  write_folder_dataset(root)
  rows = (root / "interactions.csv").read_text().splitlines()
  rows[3] = rows[3].rsplit(",", 1)[0] + ",1e30"
  (root / "interactions.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(DataError, match=r"interactions\.csv:4: timestamp '1e30' is out of range"):
    pipeline.load(folder_config(root, tmp_path / "tfds").data)
  assert not (tmp_path / "tfds").exists() or not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_unbalanced_quote_is_named_at_its_line(tmp_path):
  path = tmp_path / "interactions.csv"
  rows = [f"u{k},it{k},2020-01-01" for k in range(1, 141)]
  rows[3] = 'u4,"it4,2020-01-01'  # Line 5 of the file.
  path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
  with pytest.raises(DataError, match=r"interactions\.csv:5: 2 fields, expected 3 as in the "
                     r"header \(this row runs on to line 141: is a quote '\"' on line 5 left"):
    builders.read_csv_columns(str(path), ("user_id", "item_id"), ("timestamp",))


def test_duplicate_items_csv_row_is_refused(tmp_path):
  root = tmp_path / "ds"
  write_folder_dataset(root)
  with open(root / "items.csv", "a") as f:
    f.write("it3,cat9,blue\n")  # it3 is line 5; this is line 132.
  with pytest.raises(DataError, match=r"items\.csv:132: item_id 'it3' repeats line 5; expected "
                     r"one row per item_id"):
    pipeline.load(folder_config(root, tmp_path / "tfds").data)


def test_duplicate_header_column_is_refused(tmp_path):
  root = tmp_path / "ds"
  write_folder_dataset(root)
  rows = (root / "interactions.csv").read_text().splitlines()
  _write_interactions(root, [r + ",2020-02-02" for r in rows[1:]],
                      header="user_id,item_id,timestamp,timestamp")
  with pytest.raises(DataError, match=r"interactions\.csv:1: the header names column "
                     r"'timestamp' more than once \(columns 3, 4\)"):
    pipeline.load(folder_config(root, tmp_path / "tfds").data)


def test_dates_before_1970_are_timestamps(tmp_path):
  root = tmp_path / "ds"
  write_folder_dataset(root)
  rows = (root / "interactions.csv").read_text().splitlines()[1:]
  rows = [r.replace("2020-", "1969-") for r in rows]  # Negative epoch seconds.
  _write_interactions(root, rows)
  d = pipeline.load(folder_config(root, tmp_path / "tfds", **{"data.split": "time"}).data)
  assert d.has_timestamps
  last = {r.split(",")[0]: r.split(",")[1] for r in rows if r.endswith("1969-01-06")}
  for u, user in enumerate(d.user_ids):
    assert d.item_ids[d.test_items[u]] == last[user]  # The latest purchase is held out.


# ---- Images -------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [(0.5, 128), (1.0, 255), (30000.0, 117), (200.0, 200)])
def test_float_tiff_is_scaled_by_its_white_level(tmp_path, value, expected):
  arr = np.full((16, 16), value, np.float32)
  arr[0, 0] = 0.0
  Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
  out = load_image(tmp_path / "f.tif", 16)
  assert out.shape == (16, 16, 3)
  assert int(out[8, 8, 0]) == expected and int(out[0, 0, 1]) == 0


@pytest.mark.parametrize("value,message", [(70000.0, r"float pixels up to 70000 have no known "
                                                     r"white level"),
                                           (np.nan, r"float pixels include NaN or infinity")])
def test_float_tiff_without_white_level_is_named(tmp_path, value, message):
  Image.fromarray(np.full((8, 8), value, np.float32), mode="F").save(tmp_path / "f.tif")
  with pytest.raises(DataError, match=r"f\.tif: cannot decode image \(" + message):
    load_image(tmp_path / "f.tif", 8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size,message", [
    ((15000, 15000), r"the image has 225000000 pixels \(225\.0 megapixels\)"),  # PIL's error.
    ((10000, 9000), r"the image has 10000 x 9000 pixels \(90\.0 megapixels\)"),  # PIL warns.
])
def test_too_many_pixels_are_refused_by_name(tmp_path, size, message):
  Image.new("1", size).save(tmp_path / "big.png")  # 1 bit per pixel: small to make.
  with pytest.raises(DataError, match=r"big\.png: " + message + r", more than the 89\.5 "
                     r"megapixels jaxvars decodes \(jaxvars\.data\.images\.MAX_PIXELS\)"):
    load_image(tmp_path / "big.png", 32)


@pytest.mark.parametrize("shape", [(10, 20000), (20000, 10)])
def test_thin_image_is_resized_before_padding(tmp_path, shape):
  arr = np.full(shape + (3,), 255, np.uint8)
  arr[shape[0] // 2, :] = 0 if shape[0] == 10 else 255
  arr[:, shape[1] // 2] = 0 if shape[1] == 10 else 255
  Image.fromarray(arr).save(tmp_path / "thin.png")
  tracemalloc.start()
  try:
    out = load_image(tmp_path / "thin.png", 64)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # Padding first made a 20000 x 20000 x 3 square (1.2 GB); now at most 4096 x 4096 x 3.
  assert images.MAX_SQUARE_SIDE == 4096
  assert peak < 4 * 4096 * 4096 * 3, peak
  assert out.min() < 255  # The thin dark line is still there, at the centre.


# ---- Files jaxvars wrote that are damaged ----------------------------------------------

@pytest.fixture
def damaged_tfds(tiny_data, tfds_dir, tmp_path):
  """A copy of the session's prepared tiny tables (never damage the shared one)."""
  del tiny_data  # Prepared in tfds_dir.
  copy = tmp_path / "tfds"
  shutil.copytree(tfds_dir, copy)
  return copy


@pytest.mark.parametrize("table,damage", [("images", "truncate"), ("interactions", "truncate"),
                                          ("images", "corrupt"), ("images", "info")])
def test_damaged_prepared_table_is_named(damaged_tfds, table, damage):
  (data_file,) = glob.glob(str(damaged_tfds / "synthetic_fashion" / f"{table}*" / "*" /
                               "*.array_record*"))
  if damage == "truncate":
    os.truncate(data_file, os.path.getsize(data_file) // 2)
  elif damage == "corrupt":
    with open(data_file, "r+b") as f:
      f.seek(os.path.getsize(data_file) // 3)
      f.write(b"\xff" * 4096)
  else:
    with open(os.path.join(os.path.dirname(data_file), "dataset_info.json"), "w") as f:
      f.write('{"name": ')
  with pytest.raises(DataError, match=rf"synthetic_fashion/{table}[^:]*: the prepared {table} "
                     r"table (is damaged|cannot be opened) .*; delete that directory and rerun"):
    pipeline.load(tiny_config(damaged_tfds).data)


def test_truncated_results_json_is_named_before_evaluating(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "results.json").write_text('{"ranking": {"vbpr/clean": {"HR@10": 0.4')
  with pytest.raises(DataError, match=r"results\.json is not valid JSON \(.*truncated\?\); "
                     r"delete it"):
    run.evaluate(tiny_config(tmp_path / "tfds"), str(workdir))


def test_pickled_artifacts_are_refused_by_name(tmp_path):
  (tmp_path / "results.json").write_text(json.dumps({"ranking": {}}))
  np.savez(tmp_path / "artifacts.npz", scores=np.array([{"x": 1}], dtype=object))
  with pytest.raises(DataError, match=r"artifacts\.npz holds pickled \(object\) arrays, which "
                     r"jaxvars never writes and does not load"):
    report_writer.write_report(str(tmp_path))


def test_unwritable_tfds_dir_is_named(tmp_path):
  (tmp_path / "a_file").write_text("")
  c = tiny_config(tmp_path / "a_file" / "tfds")
  with pytest.raises(DataError, match=r"config\.data\.tfds_dir='.*a_file/tfds' .*: cannot write "
                     r"the prepared tables there"):
    pipeline.load(c.data)


# ---- A full disk ---------------------------------------------------------------------------

def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("write,patch", [
    (lambda p: atomic.write_json(p, {"a": 1}), "json.dump"),
    (lambda p: atomic.write_npz(p, {"a": np.zeros(3)}), "numpy.savez_compressed"),
    (lambda p: atomic.write_text(p, "new"), None),
])
def test_full_disk_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch, write, patch):
  path = tmp_path / "results.json"
  path.write_text("old")
  real = os.fdopen
  with monkeypatch.context() as mp:
    if patch:
      mp.setattr(patch, _no_space)
    else:  # A write on the file object itself fails.
      mp.setattr(atomic.os, "fdopen", lambda *a, **k: _Failing(real(*a, **k)))
    with pytest.raises(DiskFullError, match=rf"{path}: no space left on device \(No space left "
                       r"on device\); the file was not written and no file was left "
                       r"half-written"):
      write(str(path))
  assert path.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # No temporary file is left.


class _Failing:
  """A file object whose writes fail for lack of space."""

  def __init__(self, f):
    self._f = f

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)

  def write(self, *args):
    _no_space()


def test_full_disk_while_preparing_names_the_table(tmp_path, monkeypatch):
  monkeypatch.setattr(builders.SyntheticFashion, "download_and_prepare", _no_space)
  with pytest.raises(DataError, match=r"synthetic_fashion/interactions[^:]*: cannot write the "
                     r"prepared table there \(No space left on device\); its partly written "
                     r"files were removed"):
    pipeline.load(tiny_config(tmp_path / "tfds").data)


def test_full_disk_elsewhere_is_one_line():
  from jaxvars import main
  line = main.disk_full_message(OSError(errno.ENOSPC, "No space left on device", "/w/x.ckpt"))
  assert line.startswith("no space left on device writing /w/x.ckpt (No space left on device); ")
  assert "none was left half-written" in line and "\n" not in line


# ---- Training that diverges, and a stage without its record -------------------------------

def test_loss_far_above_its_start_stops_the_stage():
  check_finite([0.7, 5.0, 600.0], where="x", advice="a", latest_checkpoint=None, reference=0.7)
  with pytest.raises(DivergingLossError, match=r"diverging recommender \(epoch 1\) loss "
                     r"\(4\.6e\+25\) at step 3 of 4: above 1000 x max\(\|first loss\| 0\.6931, 1\) "
                     r"= 1000 .*lower lr; training stopped; checkpoints saved before stay valid "
                     r"\(latest: None\)"):
    check_finite([0.6931, 3.0, 4.6e25, 5e25], where="recommender (epoch 1)", advice="lower lr",
                 latest_checkpoint=None, reference=0.6931)
  assert DIVERGENCE_FACTOR == 1e3


def test_recommender_with_a_huge_lr_stops(tmp_path):
  """lr=1e12 took BPR's loss to 4.6e25 without a word; now the stage stops at epoch 1."""
  from conftest import tiny_models
  from jaxvars import sharding
  from jaxvars.training import recommender as rec_training
  models, params, consts, _, users, items = tiny_models()
  config = tiny_config(tmp_path, **{"recommender.lr": 1e12, "recommender.epochs": 3,
                                    "recommender.batch_size": 8})
  data = types.SimpleNamespace(train_users=users.astype(np.int32),
                               train_items=items.astype(np.int32), num_items=40)
  exp = types.SimpleNamespace(config=config, params=params, models=models, data=data,
                              mesh=sharding.make_mesh(1),
                              rec_steps_per_epoch=-(-len(users) // 8), backbone_vars={},
                              inputs={})
  with pytest.raises(DivergingLossError, match=r"diverging recommender \(epoch 1\) loss "
                     r"\(.*e\+\d\d\) at step \d+ of \d+: above 1000 x .*lower "
                     r"config\.recommender\.lr \(now 1000000000000\.0\)"):
    rec_training.train_recommender(exp, consts, str(tmp_path / "run"))
  assert not records.has_checkpoints(str(tmp_path / "run" / "checkpoints" / "recommender"))


def test_checkpoints_without_their_record_are_a_stated_problem(tmp_path):
  stage = tmp_path / "checkpoints" / records.RECOMMENDER
  (stage / "120").mkdir(parents=True)  # An Orbax step whose jaxvars_stage.json was deleted.
  with pytest.raises(ConfigError, match=r"recommender: its checkpoints have no "
                     r"jaxvars_stage\.json beside them, so the settings and inputs they were "
                     r"trained with are unknown.*retrain_changed"):
    records.check_workdir(str(tmp_path), {records.RECOMMENDER: {"fields": {"recommender.lr": 1},
                                                                "inputs": {}}}, resume="error")


def test_every_new_error_is_a_jaxvars_error():
  assert issubclass(DiskFullError, JaxvarsError) and issubclass(DivergingLossError, JaxvarsError)


def test_batch_larger_than_the_training_pairs_wraps_around():
  """A batch bigger than the training pairs (a tiny dataset, the H&M batch of 1,024) used to
  be a raw reshape error; every pair now appears, each batch is full, and the ordinary case
  is unchanged (the first len(pairs) triplets are one permutation)."""
  import types

  from jaxvars.training.recommender import epoch_triplets
  users = np.array([0, 0, 1, 1, 2], np.int32)
  items = np.array([0, 1, 1, 2, 3], np.int32)
  data = types.SimpleNamespace(train_users=users, train_items=items, num_items=6)
  keys = np.sort(users.astype(np.int64) * 6 + items)
  out = epoch_triplets(data, keys, seed=0, epoch=0, batch_size=16)
  assert out["user"].shape == (1, 16)
  pairs = set(zip(out["user"].ravel().tolist(), out["pos"].ravel().tolist()))
  assert pairs == set(zip(users.tolist(), items.tolist()))
  flat = out["user"].ravel() * 6 + out["pos"].ravel()
  assert sorted(flat[:5].tolist()) == sorted(keys.tolist())
  assert np.array_equal(flat[5:10], flat[:5])  # Wrapped around from the start.
  assert not np.isin(out["user"].ravel() * 6 + out["neg"].ravel(), keys).any()
