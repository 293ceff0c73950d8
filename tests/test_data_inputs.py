"""Trustworthy data inputs: every bad CSV named (file, line, field) before any table is
written; photos of every mode decoded to the right RGB; prepared tables and split.npz
keyed by the content of the source files, so a changed file is never silently reused."""

import io
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from test_data import folder_config, write_folder_dataset
from jaxvars.data import builders, pipeline
from jaxvars.data.images import load_image
from jaxvars.errors import ConfigError, DataError


# ---- Photos -------------------------------------------------------------------------

def _save(img: Image.Image, path, **kw):
  img.save(path, **kw)
  return path


@pytest.mark.parametrize("fmt,dtype", [("png", "<u2"), ("tiff", "<u2"), ("tiff", ">u2"),
                                       ("tiff", "<i4")])
def test_sixteen_bit_grey_is_scaled_by_bit_depth(tmp_path, fmt, dtype):
  """16-bit grey (I;16 PNG, I;16 / I;16B TIFF, 'I' holding 16-bit data) -> round(v / 257)."""
  values = np.array([[0, 257, 30000, 60000], [65535, 128, 129, 32896]] * 2, np.uint16)
  img = Image.fromarray(values.astype(dtype))
  path = _save(img, tmp_path / f"grey16.{fmt}")
  out = load_image(path, 4)
  expected = np.array([[0, 1, 117, 233], [255, 0, 1, 128]] * 2, np.uint8)
  np.testing.assert_array_equal(out[..., 0], expected)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])  # Grey: R = G = B.


def test_thirty_two_bit_integer_pixels_are_named(tmp_path):
  path = _save(Image.fromarray(np.full((4, 4), 1 << 20, np.int32)), tmp_path / "deep.tiff")
  with pytest.raises(DataError, match=r"deep\.tiff: cannot decode image \(32-bit integer "
                     r"pixels in 1048576\.\.1048576"):
    load_image(path, 4)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_transparent_pixels_show_the_background(tmp_path, background):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[...] = (255, 0, 0, 0)             # Fully transparent red: must not show.
  rgba[0, 0] = (0, 0, 255, 255)          # Opaque blue.
  rgba[0, 1] = (0, 0, 255, 128)          # Half-transparent blue.
  path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "cutout.png")
  out = load_image(path, 4, background=background).astype(int)
  bg = np.array(background)
  np.testing.assert_array_equal(out[3, 3], bg)
  np.testing.assert_array_equal(out[0, 0], (0, 0, 255))
  half = np.round((np.array((0, 0, 255)) * 128 + bg * 127) / 255)
  assert np.abs(out[0, 1] - half).max() <= 1


def test_grey_with_alpha_is_composited(tmp_path):
  la = np.zeros((4, 4, 2), np.uint8)
  la[...] = (0, 0)          # Transparent black.
  la[1, 1] = (90, 255)      # Opaque grey.
  path = _save(Image.fromarray(la, "LA"), tmp_path / "la.png")
  out = load_image(path, 4)
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[1, 1], (90, 90, 90))


def test_palette_png_with_a_transparent_index(tmp_path):
  p = Image.new("P", (4, 4), 0)
  p.putpalette([255, 0, 0, 0, 160, 0])   # Index 0: red (transparent), 1: green.
  p.putpixel((2, 1), 1)
  path = _save(p, tmp_path / "palette.png", transparency=0)
  out = load_image(path, 4, background=(7, 8, 9))
  np.testing.assert_array_equal(out[0, 0], (7, 8, 9))
  np.testing.assert_array_equal(out[1, 2], (0, 160, 0))
  # Without transparency a palette image keeps its colours.
  path = _save(p, tmp_path / "opaque.png")
  np.testing.assert_array_equal(load_image(path, 4)[0, 0], (255, 0, 0))


def _adobe_marker(jpeg: bytes) -> int:
  """Offset of the APP14 'Adobe' segment (0xFFEE, 2-byte length, 'Adobe'); -1 if none."""
  k = jpeg.find(b"\xff\xee")
  while k >= 0 and jpeg[k + 4:k + 9] != b"Adobe":
    k = jpeg.find(b"\xff\xee", k + 1)
  return k


def _strip_adobe_marker(jpeg: bytes) -> bytes:
  """The JPEG without its APP14 'Adobe' segment."""
  k = _adobe_marker(jpeg)
  length = int.from_bytes(jpeg[k + 2:k + 4], "big")
  return jpeg[:k] + jpeg[k + 2 + length:]


@pytest.mark.parametrize("adobe_marker", [True, False])
def test_cmyk_jpeg_becomes_the_right_rgb(tmp_path, adobe_marker):
  """PIL reads CMYK JPEGs with Adobe's inverted polarity, marker or not, as browsers do."""
  colour = (200, 30, 60)
  buf = io.BytesIO()
  Image.new("RGB", (16, 16), colour).convert("CMYK").save(buf, "JPEG", quality=95)
  data = buf.getvalue()
  assert _adobe_marker(data) >= 0
  if not adobe_marker:
    data = _strip_adobe_marker(data)
  (tmp_path / "cmyk.jpg").write_bytes(data)
  with Image.open(tmp_path / "cmyk.jpg") as img:
    assert img.mode == "CMYK" and ("adobe" in img.info) == adobe_marker
  out = load_image(tmp_path / "cmyk.jpg", 16).astype(int)
  assert np.abs(out[8, 8] - colour).max() <= 6, out[8, 8]


@pytest.mark.parametrize("orientation,corner", [(1, (0, 0)), (6, (0, 1)), (8, (1, 0)),
                                                (3, (1, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, corner):
  """A red top-left quadrant as stored shows up where the EXIF orientation puts it."""
  img = np.full((32, 32, 3), 255, np.uint8)
  img[:16, :16] = (220, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = _save(Image.fromarray(img), tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
  out = load_image(path, 32).astype(int)
  quadrants = {(r, c): out[r * 16 + 8, c * 16 + 8] for r in (0, 1) for c in (0, 1)}
  for where, pixel in quadrants.items():
    red = pixel[0] > 180 and pixel[1] < 60
    assert red == (where == corner), (where, pixel)


def test_exif_rotation_comes_before_padding(tmp_path):
  """A 20 x 40 (w x h) photo stored sideways (orientation 6) is padded left/right."""
  img = np.zeros((20, 40, 3), np.uint8)   # Stored 40 wide, 20 high: landscape.
  img[...] = (0, 0, 200)
  exif = Image.Exif()
  exif[0x0112] = 6
  path = _save(Image.fromarray(img), tmp_path / "side.jpg", quality=95, exif=exif.tobytes())
  with Image.open(path) as raw:
    assert raw.size == (40, 20)
  out = load_image(path, 40)
  assert out.shape == (40, 40, 3)
  assert np.abs(out[:, 20].astype(int) - (0, 0, 200)).max() < 10  # The centre column is photo.


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_becomes_rgb(tmp_path, mode):
  grey = np.zeros((4, 4), np.uint8)
  grey[:2] = 255
  path = _save(Image.fromarray(grey).convert(mode), tmp_path / f"{mode}.png")
  out = load_image(path, 4)
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[3, 3], (0, 0, 0))


@pytest.mark.parametrize("value", [(256, 0, 0), (1, 2), "white", (1.0, 2, 3), (-1, 0, 0),
                                   (True, 0, 0)])
def test_background_must_be_three_bytes(tmp_path, value):
  c = tiny_config(tmp_path / "tfds")
  with c.data.ignore_type():   # The command line only passes tuples; Python callers may not.
    c.data.background = value
  with pytest.raises(ConfigError, match=r"config\.data\.background=.* must be 3 ints in 0\.\.255"):
    pipeline.load(c.data)
  assert not (tmp_path / "tfds").exists()


def test_background_reaches_the_prepared_images(tmp_path):
  write_folder_dataset(tmp_path / "ds")
  for path in (tmp_path / "ds" / "images").iterdir():   # Every photo fully transparent.
    Image.fromarray(np.zeros((30, 20, 4), np.uint8), "RGBA").save(path)
  d = pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds",
                                  **{"data.background": (0, 0, 255)}).data)
  np.testing.assert_array_equal(np.unique(d.images.reshape(-1, 3), axis=0), [[0, 0, 255]])


# ---- CSV files ----------------------------------------------------------------------

INTER = "user_id,item_id,timestamp,rating\n"
TRANS = "t_dat,customer_id,article_id,price,sales_channel_id\n"


def write_hm_dataset(root, n_users=6, n_items=40):
  """A small H&M-layout directory: every customer buys 6 articles on successive days."""
  rng = np.random.default_rng(1)
  articles = [f"0{100000000 + k}" for k in range(n_items)]
  os.makedirs(root, exist_ok=True)
  with open(root / "transactions_train.csv", "w") as f:
    f.write(TRANS)
    for u in range(n_users):
      for k, a in enumerate(rng.choice(articles, 6, replace=False)):
        f.write(f"2020-09-{k + 1:02d},c{u:04d},{a},0.03,2\n")
  with open(root / "articles.csv", "w") as f:
    f.write("article_id,product_code,product_type_name\n")
    f.writelines(f"{a},{a[:7]},Trousers\n" for a in articles)
  for a in articles:
    os.makedirs(root / "images" / a[:3], exist_ok=True)
    grey = int(a) % 200
    Image.new("RGB", (20, 30), (grey,) * 3).save(root / "images" / a[:3] / f"{a}.jpg")


def _latin1(text):
  return text.encode("latin-1")


# (dataset, file, content (bytes or str), message regex)
CSV_CASES = [
    # Not UTF-8: line and column of the first bad byte.
    ("folder", "interactions.csv", _latin1(INTER + "u0,it1,,1\nu0,café,,1\n"),
     r"interactions\.csv: line 3 is not UTF-8 \(byte\(s\) e9 at column 7\); save the file as "
     r"UTF-8"),
    ("folder", "items.csv", _latin1("item_id,category\nit1,cat0\nit2,Kleidung\nit3,Röcke\n"),
     r"items\.csv: line 4 is not UTF-8 \(byte\(s\) f6 at column 6\)"),
    ("hm", "transactions_train.csv", _latin1(TRANS + "2020-09-01,cüst,0100000001,0.1,2\n"),
     r"transactions_train\.csv: line 2 is not UTF-8 \(byte\(s\) fc at column 13\)"),
    ("hm", "articles.csv", _latin1("article_id,product_type_name\n0100000001,Blusé\n"),
     r"articles\.csv: line 2 is not UTF-8"),
    # No rows.
    ("folder", "interactions.csv", INTER, r"interactions\.csv has no rows \(only a header\)"),
    ("folder", "interactions.csv", "", r"interactions\.csv has no rows \(the file is empty\)"),
    ("folder", "items.csv", "item_id,category\n", r"items\.csv has no rows \(only a header\)"),
    ("hm", "transactions_train.csv", TRANS, r"transactions_train\.csv has no rows"),
    ("hm", "articles.csv", "", r"articles\.csv has no rows \(the file is empty\)"),
    # Another number of fields than the header.
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2,,1\nu0,it,3,,1\n",
     r"interactions\.csv:4: 5 fields, expected 4 as in the header; quote fields that contain"),
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2\n",
     r"interactions\.csv:3: 2 fields, expected 4 as in the header$"),
    ("folder", "items.csv", "item_id,category\nit1,shoes, boots\n",
     r"items\.csv:2: 3 fields, expected 2"),
    ("hm", "transactions_train.csv", TRANS + "2020-09-01,c1,0100000001,0.1,2,\n",
     r"transactions_train\.csv:2: 6 fields, expected 5"),
    # Ratings: empty, NaN, infinite and text are errors naming the line.
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2,,\n",
     r"interactions\.csv:3: rating '' is empty; expected a number"),
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2,,nan\n",
     r"interactions\.csv:3: rating 'nan' is not a finite number"),
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2,,-inf\n",
     r"interactions\.csv:3: rating '-inf' is not a finite number"),
    ("folder", "interactions.csv", INTER + "u0,it1,,1\nu0,it2,,good\n",
     r"interactions\.csv:3: rating 'good' is not a number"),
    # Timestamps and days.
    ("folder", "interactions.csv", INTER + "u0,it1,2020-01-01,1\nu0,it2,yesterday,1\n",
     r"interactions\.csv:3: timestamp 'yesterday' is neither a number nor an ISO date/time"),
    ("folder", "interactions.csv", INTER + "u0,it1,1e400,1\n",
     r"interactions\.csv:2: timestamp '1e400' is neither a number nor an ISO date/time"),
    ("folder", "interactions.csv", INTER + "u0,it1,NaN,1\n",
     r"interactions\.csv:2: timestamp 'NaN' is neither"),
    ("hm", "transactions_train.csv", TRANS + "2020-09-01,c1,0100000001,0.1,2\n"
     "2020-13-01,c1,0100000002,0.1,2\n",
     r"transactions_train\.csv:3: t_dat '2020-13-01' is not a YYYY-MM-DD date"),
    # Empty ids.
    ("folder", "interactions.csv", INTER + "u0,it1,,1\n,it2,,1\n",
     r"interactions\.csv:3: user_id is empty"),
    ("hm", "transactions_train.csv", TRANS + "2020-09-01,c1,,0.1,2\n",
     r"transactions_train\.csv:2: article_id is empty"),
    # Line numbers are lines of the file: blank lines and quoted line breaks count.
    ("folder", "interactions.csv", INTER + "u0,it1,,1\n\n\"u\n1\",it2,,1\nu0,it3,,x\n",
     r"interactions\.csv:6: rating 'x' is not a number"),
]


@pytest.mark.parametrize("dataset,name,content,message", CSV_CASES,
                         ids=[f"{c[0]}-{c[1]}-{k}" for k, c in enumerate(CSV_CASES)])
def test_bad_csv_is_named_before_any_table_is_written(tmp_path, dataset, name, content, message):
  root = tmp_path / "ds"
  if dataset == "folder":
    write_folder_dataset(root)
    config = folder_config(root, tmp_path / "tfds")
  else:
    write_hm_dataset(root)
    config = tiny_config(tmp_path / "tfds", **{"data.name": "hm", "data.manual_dir": str(root),
                                               "data.eval_negatives": 10})
  path = root / name
  (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  with pytest.raises(DataError, match=message) as err:
    pipeline.load(config.data)
  assert str(err.value).startswith(str(path)), err.value   # The full path of the file.
  assert "\n" not in str(err.value)
  leftovers = list((tmp_path / "tfds").rglob("*")) if (tmp_path / "tfds").exists() else []
  assert not [p for p in leftovers if "incomplete" in p.name]
  assert not [p for p in leftovers if p.name == "dataset_info.json"]   # Nothing prepared.


def test_utf8_with_byte_order_mark_is_read(tmp_path):
  write_folder_dataset(tmp_path / "ds")
  text = (tmp_path / "ds" / "interactions.csv").read_text()
  (tmp_path / "ds" / "interactions.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
  d = pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data)
  assert d.num_users == 6


def test_hm_layout_is_read(tmp_path):
  write_hm_dataset(tmp_path / "hm")
  c = tiny_config(tmp_path / "tfds", **{"data.name": "hm", "data.manual_dir": str(tmp_path / "hm"),
                                        "data.eval_negatives": 10, "data.split": "time"})
  d = pipeline.load(c.data)
  assert d.num_users == 6 and len(d.train_users) == 30 and d.has_timestamps
  assert set(d.categories) == {"Trousers"}


# ---- Content fingerprints -----------------------------------------------------------

def _prepared(tfds_dir):
  """{config dir name: mtime_ns of its dataset_info.json} of every prepared table."""
  return {p.parent.parent.name: p.stat().st_mtime_ns
          for p in tfds_dir.rglob("dataset_info.json")}


def _messages(caplog, text):
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_same_files_reuse_the_prepared_tables(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  first = pipeline.load(config.data)
  prepared = _prepared(tmp_path / "tfds")
  assert len(prepared) == 2 and len(_messages(caplog, "preparing folder_dataset/")) == 2
  caplog.clear()
  second = pipeline.load(config.data)
  assert _prepared(tmp_path / "tfds") == prepared    # Same entries, not rewritten.
  assert not _messages(caplog, "preparing")
  np.testing.assert_array_equal(first.images, second.images)
  index = json.loads((tmp_path / "tfds" / pipeline.SOURCES_INDEX).read_text())
  entry = index[f"folder:{tmp_path / 'ds'}"]
  assert set(entry["files"]) == {"interactions.csv", "items.csv", "images/"}


def test_deleted_rows_are_prepared_again(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds", **{"data.eval_negatives": 10})
  before = pipeline.load(config.data)
  prepared = _prepared(tmp_path / "tfds")
  csv_path = tmp_path / "ds" / "interactions.csv"
  lines = csv_path.read_text().splitlines(keepends=True)
  csv_path.write_text("".join(l for l in lines if not l.startswith("u5,")))   # 6 rows fewer.
  caplog.clear()
  after = pipeline.load(config.data)
  assert (before.num_users, after.num_users) == (6, 5)
  assert len(after.train_users) == len(before.train_users) - 5
  now = _prepared(tmp_path / "tfds")
  assert len(now) == 4 and set(prepared) < set(now)      # Both tables made anew.
  changed = _messages(caplog, "source files changed since")
  assert len(changed) == 1 and "interactions.csv" in changed[0] and "items.csv" not in changed[0]
  assert "preparing again" in changed[0]
  caplog.clear()
  pipeline.load(config.data)                              # Reported once, not on every run.
  assert not _messages(caplog, "source files changed") and not _messages(caplog, "preparing")


def test_changed_photo_or_background_prepares_only_the_images_again(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  pipeline.load(config.data)
  prepared = _prepared(tmp_path / "tfds")
  photo = tmp_path / "ds" / "images" / "it0.png"
  Image.new("RGB", (25, 25), (9, 99, 199)).save(photo)
  caplog.clear()
  pipeline.load(config.data)
  now = _prepared(tmp_path / "tfds")
  new = set(now) - set(prepared)
  assert len(new) == 1 and next(iter(new)).startswith("images32-")
  changed = _messages(caplog, "source files changed since")
  assert len(changed) == 1 and "images/" in changed[0]
  config.data.background = (0, 0, 0)
  pipeline.load(config.data)
  assert len(_prepared(tmp_path / "tfds")) == len(now) + 1


def test_same_ids_but_deleted_rows_invalidate_a_stored_split(tmp_path):
  """Deleting the repeated purchase keeps every user and item: the ids check alone
  would accept the old split; the stored sha256 of interactions.csv does not."""
  rows = write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  workdir = tmp_path / "run"
  pipeline.load(config.data, workdir=str(workdir))
  csv_path = tmp_path / "ds" / "interactions.csv"
  lines = csv_path.read_text().splitlines(keepends=True)
  assert lines[-1] == lines[1] and len(lines) == len(rows) + 1
  csv_path.write_text("".join(lines[:-1]))
  with pytest.raises(DataError, match=r"split\.npz: source files changed since this split was "
                     r"made: interactions\.csv changed \(sha256 [0-9a-f]{12} -> [0-9a-f]{12}\); "
                     r"use a fresh --workdir"):
    pipeline.load(config.data, workdir=str(workdir))
  assert len(_prepared(tmp_path / "tfds")) == 2       # Stopped before preparing anything.
  d = pipeline.load(config.data, workdir=str(tmp_path / "fresh"))
  assert d.num_users == 6


def test_added_items_csv_invalidates_a_stored_split(tmp_path):
  write_folder_dataset(tmp_path / "ds")
  os.remove(tmp_path / "ds" / "items.csv")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  pipeline.load(config.data, workdir=str(tmp_path / "run"))
  (tmp_path / "ds" / "items.csv").write_text("item_id,category\nit1,shoe\n")
  with pytest.raises(DataError, match=r"split\.npz: .*items\.csv appeared; use a fresh --workdir"):
    pipeline.load(config.data, workdir=str(tmp_path / "run"))


def test_split_without_stored_source_is_accepted_with_a_warning(tmp_path, caplog):
  """A split.npz written before source fingerprints were stored still loads."""
  write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  first = pipeline.load(config.data, workdir=str(tmp_path / "run"))
  path = tmp_path / "run" / "split.npz"
  with np.load(path) as z:
    old = {k: z[k] for k in z.files if k != "source"}
  np.savez(path, **old)
  caplog.set_level(logging.WARNING)
  again = pipeline.load(config.data, workdir=str(tmp_path / "run"))
  np.testing.assert_array_equal(first.eval_negatives, again.eval_negatives)
  assert _messages(caplog, "made before source fingerprints were stored")


def test_copied_directory_keeps_the_split(tmp_path):
  """A copy of the dataset (new mtimes, same bytes) keeps both the prepared tables and the
  workdir's split: both are keyed by content, not by the photos' timestamps."""
  write_folder_dataset(tmp_path / "ds")
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  first = pipeline.load(config.data, workdir=str(tmp_path / "run"))
  prepared = _prepared(tmp_path / "tfds")
  os.rename(tmp_path / "ds", tmp_path / "original")
  shutil.copytree(tmp_path / "original", tmp_path / "ds", copy_function=shutil.copy)
  for path in (tmp_path / "ds" / "images").iterdir():
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
  again = pipeline.load(config.data, workdir=str(tmp_path / "run"))
  np.testing.assert_array_equal(first.eval_negatives, again.eval_negatives)
  assert _prepared(tmp_path / "tfds") == prepared  # Nothing prepared again.
  # A photo whose bytes change prepares the images table anew (the split is kept).
  photo = sorted((tmp_path / "ds" / "images").iterdir())[0]
  Image.new("RGB", (20, 20), (1, 2, 3)).save(photo)
  third = pipeline.load(config.data, workdir=str(tmp_path / "run"))
  np.testing.assert_array_equal(first.eval_negatives, third.eval_negatives)
  assert len(_prepared(tmp_path / "tfds")) == 3  # The images table only, made anew.


def test_photos_are_hashed_only_after_a_stat_change(tmp_path, monkeypatch):
  """The image tree's content fingerprint is read from the tfds index while its sizes and
  mtimes are unchanged (no photo opened); a touched photo is hashed again, to the same
  fingerprint; changed bytes change it."""
  write_folder_dataset(tmp_path / "ds", n_items=40)
  config = folder_config(tmp_path / "ds", tmp_path / "tfds")
  before = pipeline._source_files(config.data)
  assert before["images/"] == builders.directory_sha256(str(tmp_path / "ds" / "images"))
  import builtins
  real_open = builtins.open
  opened = []

  def counting(path, *a, **kw):
    if str(path).endswith(".png"):
      opened.append(path)
    return real_open(path, *a, **kw)
  monkeypatch.setattr(builtins, "open", counting)
  assert pipeline._source_files(config.data) == before
  assert opened == []
  os.utime(tmp_path / "ds" / "images" / "it3.png", ns=(1, 1))
  assert pipeline._source_files(config.data) == before
  assert len(opened) == 40  # Hashed again once...
  assert pipeline._source_files(config.data) == before
  assert len(opened) == 40  # ...and remembered.
  monkeypatch.setattr(builtins, "open", real_open)
  Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "ds" / "images" / "it3.png")
  assert pipeline._source_files(config.data)["images/"] != before["images/"]


def test_preparing_leaves_no_temporary_directories(tmp_path, monkeypatch):
  # tfds makes an empty /tmp/tmp*tfds directory per builder of an unprepared dataset (its
  # GCS look-up) and never removes it; ours skip that look-up.
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  write_folder_dataset(tmp_path / "ds")
  pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data)
  assert len(list((tmp_path / "tfds").rglob("dataset_info.json"))) == 2  # Both tables prepared.
  assert sorted(p.name for p in system_tmp.glob("*tfds")) == []
