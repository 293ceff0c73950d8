"""tensorflow-datasets builders for the datasets jaxvars trains on.

Every dataset is prepared as two tables, each a builder config:

* ``interactions``: one example per user: ``user_id`` (str), ``item_ids`` [n] str,
  ``timestamps`` [n] int64 (-1 where the source has none), ``ratings`` [n] float32
  (1.0 where the source has none). Raw rows: repeats are kept; binarising,
  deduplication and filtering happen in :mod:`jaxvars.data.splits`.
* ``images<S>``: one example per item: ``item_id`` (str), ``category`` (str, '' if
  unknown), ``image`` uint8 [S, S, 3] (padded to a square, resized to S).

Images are stored decoded as ``tfds.features.Tensor(uint8)`` so that neither
preparation nor reading needs TensorFlow (``tfds.features.Image`` does);
the price is disk space (S*S*3 bytes per item). Storage is ``array_record`` and
reading is ``builder.as_data_source()`` (random access).

Builders:

* :class:`SyntheticFashion`: generated on this machine (:mod:`jaxvars.data.synthetic`).
* :class:`HMFashion`: H&M Personalized Fashion Recommendations in Kaggle's layout,
  read from a manual directory: ``transactions_train.csv``
  (``t_dat,customer_id,article_id,...``), optional ``articles.csv``
  (``article_id,product_type_name,...``), ``images/<first 3 digits>/<article_id>.jpg``.
* :class:`FolderDataset`: any dataset as ``interactions.csv``
  (``user_id,item_id[,timestamp][,rating]``), ``images/<item_id>.jpg|jpeg|png``,
  optional ``items.csv`` (``item_id,category``; other columns ignored).

The config name carries a fingerprint of the source (manual directory, image
size, generator settings), so two different sources never share a cache entry.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxvars.data import synthetic
from jaxvars.data.images import load_image
from jaxvars.errors import DataError

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class VarsConfig(tfds.core.BuilderConfig):
  """Builder config: which table, at which image size, from which source.

  Args:
    table: 'interactions' or 'images'.
    image_size: S of the ``images`` table (ignored for ``interactions``).
    source: JSON-serialisable description of the source (manual dir, generator
      settings, missing-image policy); hashed into the config name.
  """

  def __init__(self, *, table: str, image_size: int = 0, source: dict):
    if table not in ("interactions", "images"):
      raise ValueError(f"table={table!r} is not 'interactions' or 'images'")
    fingerprint = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{table}{image_size if table == 'images' else ''}-{fingerprint}"
    super().__init__(name=name, description=f"{table} table of {source}")
    self.table = table
    self.image_size = int(image_size)
    self.source = dict(source)


class _VarsBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared schema and example generation; subclasses read their source."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if cfg.table == "interactions":
      features = tfds.features.FeaturesDict({
          "user_id": tfds.features.Text(),
          "item_ids": tfds.features.Tensor(shape=(None,), dtype=np.object_),
          "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.int64),
          "ratings": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      })
    else:
      s = cfg.image_size
      features = tfds.features.FeaturesDict({
          "item_id": tfds.features.Text(),
          "category": tfds.features.Text(),
          "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
      })
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    if cfg.table == "interactions":
      for user_id, items, stamps, ratings in self.read_interactions():
        yield user_id, {"user_id": user_id, "item_ids": np.asarray(items, dtype=object),
                        "timestamps": np.asarray(stamps, np.int64),
                        "ratings": np.asarray(ratings, np.float32)}
    else:
      yield from self._image_examples(cfg.image_size)

  def _image_examples(self, size: int):
    items = self.item_sources()
    drop = self.builder_config.source.get("missing_images") == "drop"

    def load(entry):
      item_id, category, source = entry
      try:
        image = source(size) if callable(source) else load_image(source, size)
      except DataError:
        if drop:
          return None
        raise
      return item_id, {"item_id": item_id, "category": category, "image": image}

    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
      for result in pool.map(load, items, chunksize=64):
        if result is not None:
          yield result

  def _dir(self) -> str:
    """The manual directory of the hm and folder builders."""
    return self.builder_config.source["manual_dir"]

  # Subclass API -------------------------------------------------------------
  def read_interactions(self) -> Iterator[tuple[str, list, list, list]]:
    """Yields (user_id, item_ids, timestamps, ratings) per user."""
    raise NotImplementedError

  def item_sources(self) -> Sequence[tuple[str, str, object]]:
    """(item_id, category, path or callable(size) -> uint8 image) per item."""
    raise NotImplementedError


def _group_by_user(rows) -> Iterator[tuple[str, list, list, list]]:
  grouped = collections.defaultdict(lambda: ([], [], []))
  for user, item, stamp, rating in rows:
    g = grouped[user]
    g[0].append(item)
    g[1].append(stamp)
    g[2].append(rating)
  for user in sorted(grouped):
    yield (user, *grouped[user])


def read_csv_columns(path: str, required: Sequence[str], optional: Sequence[str] = ()):
  """Reads the named columns of a CSV file as lists of strings.

  Returns:
    dict column -> list[str] for every required column and each optional one present.

  Raises:
    DataError: naming ``path`` if it is missing, empty, or lacks a required column.
  """
  try:
    f = open(path, newline="", encoding="utf-8")
  except FileNotFoundError:
    raise DataError(f"{path}: file is missing") from None
  with f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise DataError(f"{path}: file is empty; expected a header with columns {list(required)}")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
      raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(required)}"
                      f"{' and optionally ' + str(list(optional)) if optional else ''}, "
                      f"found {header}")
    wanted = [c for c in (*required, *optional) if c in header]
    index = [header.index(c) for c in wanted]
    columns = {c: [] for c in wanted}
    for lineno, row in enumerate(reader, start=2):
      if not row:
        continue
      if len(row) < len(header):
        raise DataError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)}")
      for c, k in zip(wanted, index):
        columns[c].append(row[k].strip())
  return columns


def _parse_timestamp(value: str, path: str, lineno: int) -> int:
  if value == "":
    return -1
  try:
    return int(float(value))
  except ValueError:
    pass
  try:
    dt = datetime.datetime.fromisoformat(value)
  except ValueError:
    raise DataError(f"{path}:{lineno}: timestamp {value!r} is neither a number nor an ISO "
                    "date/time") from None
  if dt.tzinfo is None:
    dt = dt.replace(tzinfo=datetime.timezone.utc)
  return int(dt.timestamp())


def _parse_float(value: str, path: str, lineno: int, column: str) -> float:
  try:
    return float(value)
  except ValueError:
    raise DataError(f"{path}:{lineno}: {column} {value!r} is not a number") from None


class SyntheticFashion(_VarsBuilder):
  """Synthetic fashion catalogue: garment photos, users with visual tastes."""

  BUILDER_CONFIGS = []  # Made per run by `make_config`.

  def _catalogue(self) -> synthetic.SyntheticCatalogue:
    s = self.builder_config.source
    return synthetic.generate_catalogue(num_users=s["num_users"], num_items=s["num_items"],
                                        mean_interactions=s["mean_interactions"], seed=s["seed"])

  def read_interactions(self):
    for user_id, items, days in self._catalogue().interactions:
      yield user_id, list(items), list(days), [1.0] * len(items)

  def item_sources(self):
    c = self._catalogue()
    seed = self.builder_config.source["seed"]
    out = []
    for k, item_id in enumerate(c.item_ids):
      attrs = dict(shape=int(c.shape[k]), colour=int(c.colour[k]), pattern=int(c.pattern[k]))
      render = (lambda size, a=attrs, k=k: synthetic.render_item(**a, size=size,
                                                                 seed=seed * 1_000_003 + k))
      out.append((str(item_id), synthetic.SHAPES[attrs["shape"]], render))
    return out


class HMFashion(_VarsBuilder):
  """H&M Personalized Fashion Recommendations (Kaggle layout, manual directory)."""

  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the Kaggle competition 'h-and-m-personalized-fashion-recommendations' and pass "
      "its directory (transactions_train.csv, articles.csv, images/) as data.manual_dir.")

  def read_interactions(self):
    path = os.path.join(self._dir(), "transactions_train.csv")
    cols = read_csv_columns(path, ("t_dat", "customer_id", "article_id"))
    stamps = []
    for lineno, day in enumerate(cols["t_dat"], start=2):
      try:
        stamps.append(datetime.date.fromisoformat(day).toordinal())
      except ValueError:
        raise DataError(f"{path}:{lineno}: t_dat {day!r} is not a YYYY-MM-DD date") from None
    rows = zip(cols["customer_id"], cols["article_id"], stamps, [1.0] * len(stamps))
    yield from _group_by_user(rows)

  def item_sources(self):
    base = self._dir()
    items = sorted(set(read_csv_columns(os.path.join(base, "transactions_train.csv"),
                                        ("article_id",))["article_id"]))
    categories = {}
    articles = os.path.join(base, "articles.csv")
    if os.path.exists(articles):
      cols = read_csv_columns(articles, ("article_id", "product_type_name"))
      categories = dict(zip(cols["article_id"], cols["product_type_name"]))
    return [(a, categories.get(a, ""), os.path.join(base, "images", a[:3], a + ".jpg"))
            for a in items]


class FolderDataset(_VarsBuilder):
  """Generic folder: interactions.csv, images/<item_id>.<ext>, optional items.csv."""

  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass a directory with interactions.csv (user_id,item_id[,timestamp][,rating]), "
      "images/<item_id>.jpg|jpeg|png and optionally items.csv (item_id,category) as "
      "data.manual_dir.")

  def read_interactions(self):
    path = os.path.join(self._dir(), "interactions.csv")
    cols = read_csv_columns(path, ("user_id", "item_id"), ("timestamp", "rating"))
    n = len(cols["user_id"])
    stamps = ([_parse_timestamp(v, path, k) for k, v in enumerate(cols["timestamp"], start=2)]
              if "timestamp" in cols else [-1] * n)
    ratings = ([_parse_float(v, path, k, "rating") for k, v in enumerate(cols["rating"], start=2)]
               if "rating" in cols else [1.0] * n)
    for lineno, (u, i) in enumerate(zip(cols["user_id"], cols["item_id"]), start=2):
      if not u or not i:
        raise DataError(f"{path}:{lineno}: empty user_id or item_id")
    yield from _group_by_user(zip(cols["user_id"], cols["item_id"], stamps, ratings))

  def item_sources(self):
    base = self._dir()
    items = sorted(set(read_csv_columns(os.path.join(base, "interactions.csv"),
                                        ("item_id",))["item_id"]))
    categories = {}
    items_csv = os.path.join(base, "items.csv")
    if os.path.exists(items_csv):
      cols = read_csv_columns(items_csv, ("item_id", "category"))
      categories = dict(zip(cols["item_id"], cols["category"]))
    image_dir = os.path.join(base, "images")
    out = []
    for item in items:
      path = os.path.join(image_dir, item + ".jpg")  # Reported as missing if none exists.
      for ext in _IMAGE_EXTENSIONS:
        if os.path.exists(os.path.join(image_dir, item + ext)):
          path = os.path.join(image_dir, item + ext)
          break
      out.append((item, categories.get(item, ""), path))
    return out


BUILDERS = {"synthetic": SyntheticFashion, "hm": HMFashion, "folder": FolderDataset}
