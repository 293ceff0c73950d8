"""tfds builders: synthetic, generic folder, H&M (real sample where present); image loading."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_HM, requires_hm, tiny_config
from jaxvars.data import pipeline
from jaxvars.data.images import load_image


def test_synthetic_dataset(tiny_data):
  d = tiny_data
  assert d.images.dtype == np.uint8 and d.images.shape[1:] == (32, 32, 3)
  assert len(d.images) == d.num_items == len(d.item_ids) == len(d.categories)
  assert d.num_users == len(d.test_items) == len(d.eval_negatives)
  assert d.has_timestamps
  # Every user kept has >= 5 distinct items (train + test).
  counts = np.bincount(d.train_users, minlength=d.num_users) + 1
  assert counts.min() >= 5
  assert set(d.categories) <= {"tshirt", "trousers", "dress", "skirt", "bag", "shoe"}
  assert d.images.std() > 10  # Real pictures, not blank.


def test_synthetic_generation_is_deterministic(tiny_data, tmp_path):
  again = pipeline.load(tiny_config(tmp_path / "tfds2").data, workdir=None)
  np.testing.assert_array_equal(again.images, tiny_data.images)
  np.testing.assert_array_equal(again.eval_negatives, tiny_data.eval_negatives)
  np.testing.assert_array_equal(again.train_items, tiny_data.train_items)


def test_split_is_stored_and_reused(tiny_data, tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  first = pipeline.load(config.data, workdir=str(tmp_path))
  assert (tmp_path / "split.npz").exists()
  second = pipeline.load(config.data, workdir=str(tmp_path))
  np.testing.assert_array_equal(first.eval_negatives, second.eval_negatives)


def write_folder_dataset(root, *, n_users=6, n_items=130, timestamps=True, image_ext=".png",
                         bad=None):
  """A small generic-folder dataset: every user buys 6 items, at increasing times."""
  rng = np.random.default_rng(0)
  os.makedirs(root / "images", exist_ok=True)
  rows = []
  for u in range(n_users):
    for k, item in enumerate(rng.choice(n_items, 6, replace=False)):
      row = {"user_id": f"u{u}", "item_id": f"it{item}"}
      if timestamps:
        row["timestamp"] = f"2020-01-{k + 1:02d}"
      rows.append(row)
  rows.append(dict(rows[0]))  # A repeated purchase: must be deduplicated.
  with open(root / "interactions.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(root / "items.csv", "w") as f:
    f.write("item_id,category,colour\n")
    f.writelines(f"it{i},cat{i % 3},red\n" for i in range(n_items))
  for i in range(n_items):
    # Non-square images: the loader pads them to a square.
    img = np.full((30, 20, 3), (i * 2) % 256, np.uint8)
    Image.fromarray(img).save(root / "images" / f"it{i}{image_ext}")
  return rows


def folder_config(root, tfds_dir, **overrides):
  """Only ~32 items are bought in the folder dataset: rank among 20 negatives."""
  c = tiny_config(tfds_dir, **{"data.eval_negatives": 20, **overrides})
  c.data.name = "folder"
  c.data.manual_dir = str(root)
  return c


def test_folder_dataset_time_split(tmp_path):
  rows = write_folder_dataset(tmp_path / "ds")
  d = pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds", **{"data.split": "time"}).data)
  assert d.num_users == 6
  assert len(d.train_users) == 6 * 5  # Deduplicated: 6 distinct items per user, 1 held out.
  last = {r["user_id"]: r["item_id"] for r in rows[:-1] if r["timestamp"] == "2020-01-06"}
  for u, user in enumerate(d.user_ids):
    assert d.item_ids[d.test_items[u]] == last[user]
  assert set(d.categories) <= {"cat0", "cat1", "cat2"}
  assert d.images.shape[1:] == (32, 32, 3)


def test_time_split_without_timestamps_is_an_error(tmp_path):
  from jaxvars.errors import ConfigError
  write_folder_dataset(tmp_path / "ds", timestamps=False)
  with pytest.raises(ConfigError, match="config.data.split='time'.*without timestamps"):
    pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds", **{"data.split": "time"}).data)


def test_load_image_pads_to_square_with_border_colour(tmp_path):
  img = np.zeros((40, 20, 3), np.uint8)
  img[...] = (200, 10, 10)
  img[10:30, 5:15] = (0, 255, 0)
  Image.fromarray(img).save(tmp_path / "x.png")
  out = load_image(tmp_path / "x.png", 40)
  assert out.shape == (40, 40, 3)
  np.testing.assert_array_equal(out[0, 0], (200, 10, 10))   # Padding = border colour.
  np.testing.assert_array_equal(out[20, 20], (0, 255, 0))   # Content centred.


@requires_hm()
@pytest.mark.realdata
def test_hm_sample_statistics(tmp_path):
  from configs import joint
  c = joint.get_config("tiny,hm")
  c.data.manual_dir = str(SHARED_HM)
  c.data.image_size = 16
  c.data.tfds_dir = str(tmp_path / "tfds")
  d = pipeline.load(c.data)
  # Stated in ../shared/data/hm/README.md.
  assert (d.num_users, d.num_items) == (887, 16581)
  assert len(d.train_users) + len(d.test_items) == 26353
  assert d.has_timestamps
  assert (d.categories != "").sum() > 3000  # articles.csv covers 4,116 of the articles.
