"""From a data config to arrays: prepare the tfds tables, binarise, filter, split.

``load(data_config, workdir)`` returns a :class:`RecData`. The split (train pairs,
held-out items, evaluation negatives) is saved to ``<workdir>/split.npz`` the
first time and read back afterwards, so that evaluation ranks exactly the same
candidates as training did.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxvars.data import builders, splits
from jaxvars.errors import ConfigError, DataError
from jaxvars.progress import progress

SPLIT_FILE = "split.npz"


@dataclasses.dataclass(frozen=True)
class RecData:
  """A prepared, split recommendation dataset.

  Attributes:
    name: dataset name ('synthetic', 'hm', 'folder').
    user_ids: [U] str; index u of every int array below refers to user_ids[u].
    item_ids: [I] str.
    categories: [I] str ('' where unknown).
    images: [I, S, S, 3] uint8, RGB.
    train_users, train_items: [N] int32 training pairs.
    test_items: [U] int32, the leave-one-out item of each user.
    eval_negatives: [U, n] int32, negatives never touched by the user.
    has_timestamps: whether every interaction had a timestamp.
  """
  name: str
  user_ids: np.ndarray
  item_ids: np.ndarray
  categories: np.ndarray
  images: np.ndarray
  train_users: np.ndarray
  train_items: np.ndarray
  test_items: np.ndarray
  eval_negatives: np.ndarray
  has_timestamps: bool

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  def summary(self) -> dict:
    """The ``data`` section of results.json."""
    return {"name": self.name, "users": self.num_users, "items": self.num_items,
            "train_interactions": int(len(self.train_users)),
            "test_interactions": int(len(self.test_items)),
            "eval_negatives_per_user": int(self.eval_negatives.shape[1]),
            "image_size": int(self.images.shape[1]),
            "density": float((len(self.train_users) + len(self.test_items))
                             / (self.num_users * self.num_items))}


def _source(data_config) -> dict:
  name = data_config.name
  if name == "synthetic":
    s = data_config.synthetic
    return {"num_users": int(s.num_users), "num_items": int(s.num_items),
            "mean_interactions": float(s.mean_interactions), "seed": int(s.seed)}
  manual = os.path.abspath(os.path.expanduser(data_config.manual_dir))
  if not os.path.isdir(manual):
    raise DataError(f"data.manual_dir {data_config.manual_dir!r} ({manual}) is not a directory")
  return {"manual_dir": manual, "missing_images": data_config.missing_images}


def _prepare(data_config, table: str) -> tfds.core.DatasetBuilder:
  """Prepares one table (once; later calls reuse it) and returns its builder.

  On failure the partly written tfds directory is removed and the first
  :class:`DataError` in the exception chain is raised.
  """
  if data_config.name not in builders.BUILDERS:
    raise ConfigError(f"config.data.name={data_config.name!r} is not one of "
                      f"{tuple(builders.BUILDERS)}")
  cls = builders.BUILDERS[data_config.name]
  config = builders.VarsConfig(table=table, image_size=int(data_config.image_size),
                               source=_source(data_config))
  builder = cls(config=config, data_dir=data_config.tfds_dir or None, file_format="array_record")
  try:
    builder.download_and_prepare()
  except BaseException as e:
    for path in glob.glob(os.path.join(os.fspath(builder.data_path.parent), "incomplete.*")):
      shutil.rmtree(path, ignore_errors=True)
    cause = e
    while cause is not None and not isinstance(cause, DataError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None and cause is not e:
      raise cause from None
    raise
  return builder


def _read_tables(data_config):
  inter = _prepare(data_config, "interactions").as_data_source(split="train")
  imgs = _prepare(data_config, "images").as_data_source(split="train")
  users, items, stamps, ratings = [], [], [], []
  for k in progress(range(len(inter)), desc="read interactions", total=len(inter)):
    r = inter[k]
    n = len(r["item_ids"])
    users.extend([r["user_id"].decode()] * n)
    items.extend(x.decode() for x in r["item_ids"])
    stamps.append(r["timestamps"])
    ratings.append(r["ratings"])
  stamps = np.concatenate(stamps) if stamps else np.zeros(0, np.int64)
  ratings = np.concatenate(ratings) if ratings else np.zeros(0, np.float32)
  image_index = {}
  categories = {}
  for k in progress(range(len(imgs)), desc="index images", total=len(imgs)):
    r = imgs[k]
    item = r["item_id"].decode()
    image_index[item] = k
    categories[item] = r["category"].decode()
  return np.array(users), np.array(items), stamps, ratings, imgs, image_index, categories


def _fingerprint(data_config) -> str:
  fields = {k: data_config[k] for k in ("name", "manual_dir", "image_size", "min_user_interactions",
                                        "min_rating", "split", "eval_negatives", "split_seed",
                                        "missing_images")}
  if data_config.name == "synthetic":
    fields["synthetic"] = data_config.synthetic.to_dict()
  return json.dumps(fields, sort_keys=True, default=str)


def load(data_config: ml_collections.ConfigDict, workdir: str | None = None) -> RecData:
  """Prepares (if needed), reads and splits the dataset named by ``data_config``.

  Args:
    data_config: ``config.data`` of configs/joint.py.
    workdir: where ``split.npz`` is stored and re-read; None = not stored.

  Raises:
    DataError: a missing or malformed file (named), too few users or items.
    ConfigError: ``workdir`` holds a split made with other data settings.
  """
  users_s, items_s, stamps, ratings, imgs, image_index, categories = _read_tables(data_config)
  has_image = np.array([i in image_index for i in items_s], bool)
  if not has_image.all():
    logging.warning("dropping %d interactions whose item has no readable image "
                    "(data.missing_images='drop')", int((~has_image).sum()))
  users_s, items_s, stamps, ratings = (a[has_image] for a in (users_s, items_s, stamps, ratings))
  user_names, user_idx = np.unique(users_s, return_inverse=True)
  item_names, item_idx = np.unique(items_s, return_inverse=True)
  u, i, t = splits.binarize(user_idx, item_idx, stamps, ratings,
                            min_rating=float(data_config.min_rating))
  keep = splits.users_with_min_items(u, int(data_config.min_user_interactions))
  u, i, t = u[keep], i[keep], t[keep]
  if len(u) == 0:
    raise DataError(f"dataset {data_config.name!r}: no user has at least "
                    f"{data_config.min_user_interactions} distinct items "
                    "(data.min_user_interactions)")
  kept_users, u = np.unique(u, return_inverse=True)
  kept_items, i = np.unique(i, return_inverse=True)
  user_ids, item_ids = user_names[kept_users], item_names[kept_items]
  has_timestamps = bool(len(t)) and bool((t >= 0).all())

  split = _load_or_make_split(data_config, workdir, u, i, t, user_ids, item_ids, has_timestamps)
  images = np.stack([imgs[image_index[item]]["image"]
                     for item in progress(item_ids, desc="load images", total=len(item_ids))])
  return RecData(name=data_config.name, user_ids=user_ids, item_ids=item_ids,
                 categories=np.array([categories[x] for x in item_ids]), images=images,
                 has_timestamps=has_timestamps, **split)


def _load_or_make_split(data_config, workdir, u, i, t, user_ids, item_ids, has_timestamps):
  path = os.path.join(workdir, SPLIT_FILE) if workdir else None
  fingerprint = _fingerprint(data_config)
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      stored = str(z["fingerprint"])
      if stored != fingerprint:
        raise ConfigError(f"{path} was made with other data settings ({stored}) than this run's "
                          f"({fingerprint}); use a fresh --workdir")
      if not (np.array_equal(z["user_ids"], user_ids) and np.array_equal(z["item_ids"], item_ids)):
        raise DataError(f"{path}: the dataset's users or items changed since this split was made; "
                        "use a fresh --workdir")
      return {k: z[k] for k in ("train_users", "train_items", "test_items", "eval_negatives")}
  if data_config.split == "time" and not has_timestamps:
    raise ConfigError(f"config.data.split='time' but dataset {data_config.name!r} has interactions "
                      "without timestamps; use 'random'")
  rng = np.random.default_rng(int(data_config.split_seed))
  train_u, train_i, test = splits.leave_one_out(u, i, t, len(user_ids), mode=data_config.split,
                                                rng=rng)
  try:
    negatives = splits.sample_eval_negatives(train_u, train_i, test, len(item_ids),
                                             int(data_config.eval_negatives), rng=rng)
  except ValueError as e:
    raise DataError(f"dataset {data_config.name!r}: {e}") from None
  split = {"train_users": train_u, "train_items": train_i, "test_items": test,
           "eval_negatives": negatives}
  if path:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=np.array(fingerprint), user_ids=user_ids, item_ids=item_ids, **split)
    os.replace(tmp, path)
  return split
