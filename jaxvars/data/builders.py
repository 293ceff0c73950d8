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
size, generator settings, and for ``hm`` / ``folder`` the sha256 of each CSV file,
a content fingerprint of ``images/`` and the preprocessing settings; see
:func:`source_files`), so a changed file or setting never reuses a stale entry, and a
merely copied or touched one never prepares the tables again.

CSV reading, photo names and fingerprints live in :mod:`jaxvars.data.sources`. CSV files are
UTF-8 (a byte-order mark is allowed), comma-separated, with a
header row and at least one data row; every row has the header's number of
fields. Values are checked before any table is written (:meth:`check_sources`):
``rating`` must be a finite number (an empty cell, 'nan' or 'inf' is an error
naming the line), ``timestamp`` a number (seconds; negative = before 1970; within the
int64 range) or an ISO date/time, or empty (= unknown, stored as -1), ``t_dat`` a
YYYY-MM-DD date, ids non-empty. A header names each column once; ``items.csv`` and
``articles.csv`` hold one row per item (a repeated id is an error naming both lines).

Item ids name photos (:meth:`_VarsBuilder.image_paths`): an id whose photo would lie
outside the dataset folder (an absolute path, '..' leading out of ``images/``, a link to
a place outside the dataset folder and its ``images/``) is an error naming the CSV file,
line and id, before any table is written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxvars import fs
from jaxvars.data import synthetic
from jaxvars.data.sources import (  # noqa: F401 - MISSING_TIMESTAMP etc. are read from here too.
    MISSING_TIMESTAMP, OutsideError, _real_bases, csv_line, directory_fingerprint,
    directory_sha256, file_sha256, parse_day, parse_rating, parse_timestamp, read_csv_columns,
    resolve_inside)
from jaxvars.data.images import load_image
from jaxvars.errors import DataError

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class VarsConfig(tfds.core.BuilderConfig):
  """Builder config: which table, at which image size, from which source.

  Args:
    table: 'interactions' or 'images'.
    image_size: S of the ``images`` table (ignored for ``interactions``).
    source: JSON-serialisable description of the source (manual dir, generator
      settings, source file fingerprints, missing-image policy, background); hashed
      into the config name.
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


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """tfds's DatasetInfo without the GCS look-up of unprepared datasets.

  tfds (4.9) calls ``initialize_from_bucket`` whenever a builder is created for a dataset
  not yet prepared; it makes an empty ``/tmp/tmp*tfds`` directory before finding that GCS
  is disabled and never removes it, one per builder. Ours are local builds only.
  """

  def initialize_from_bucket(self) -> None:
    return None


class _VarsBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared schema and example generation; subclasses read their source."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  CSV_FILES: tuple[str, ...] = ()  # CSV files of the manual directory (fingerprinted).
  INTERACTIONS_CSV: str | None = None  # The one of CSV_FILES the interactions table reads.
  ITEM_COLUMN: str | None = None  # INTERACTIONS_CSV's item id column (names the photo).

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
    return _LocalDatasetInfo(builder=self, description=self.__doc__, features=features)

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
    background = tuple(self.builder_config.source.get("background", (255, 255, 255)))

    def load(entry):
      item_id, category, source = entry
      try:
        image = (source(size) if callable(source)
                 else load_image(source, size, background=background))
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

  def _image_relpaths(self, item_id: str) -> tuple[str, ...]:
    """The names under ``images/`` the photo of ``item_id`` may have, preferred first."""
    raise NotImplementedError

  def image_paths(self, item_ids: Sequence[str]) -> dict[str, str]:
    """{item id: path of its photo under ``<manual_dir>/images``}: the first of
    :meth:`_image_relpaths` that exists, else the first (reported as missing when read).

    Raises:
      DataError: naming the interactions CSV, the line and the id of the first id whose
        photo would lie outside the dataset folder (see :func:`resolve_inside`).
    """
    image_dir = fs.join(self._dir(), "images")
    bases = _real_bases(self._dir(), image_dir)
    out = {}
    for item in item_ids:
      first = None
      try:
        for rel in self._image_relpaths(item):
          path = resolve_inside(image_dir, rel, bases)
          first = first or path
          if fs.exists(path):
            first = path
            break
      except OutsideError as e:
        csv_path = fs.join(self._dir(), self.INTERACTIONS_CSV)
        line = csv_line(csv_path, self.ITEM_COLUMN, item)
        raise DataError(f"{csv_path}{f':{line}' if line else ''}: {self.ITEM_COLUMN} {item!r} "
                        f"names a photo outside the dataset folder ({e}); an id must name a file "
                        f"inside {image_dir}") from None
      out[item] = first
    return out

  # Subclass API -------------------------------------------------------------
  def check_sources(self) -> None:
    """Reads and checks every source CSV file; writes nothing.

    Raises:
      DataError: naming the file (and line) of the first problem found.
    """

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


def source_files(name: str, manual_dir: str, *,
                 known_images: dict | None = None) -> tuple[dict[str, str | None], str | None]:
  """Fingerprints of the files a manual-directory dataset is prepared from.

  The image tree's fingerprint is its content (:func:`directory_sha256`), so a copied or
  touched tree keeps it. Hashing every photo takes seconds, so it is skipped when the
  tree's stat fingerprint (:func:`directory_fingerprint`) equals the one ``known_images``
  recorded.

  Args:
    name: 'hm' or 'folder' (a key of :data:`BUILDERS` whose class has ``CSV_FILES``).
    manual_dir: absolute path of its directory.
    known_images: {'stat': stat fingerprint, 'sha256': content fingerprint} of an earlier
      call on the same directory (e.g. from the tfds directory's index), or None.

  Returns:
    ({csv file name: sha256 of its bytes or None if absent, ..., 'images/': content
    fingerprint of the image tree or None}, the tree's stat fingerprint or None).

  Raises:
    DataError: naming a file or directory that exists but cannot be read.
  """
  cls = BUILDERS[name]
  out = {f: file_sha256(fs.join(manual_dir, f)) for f in cls.CSV_FILES}
  images = fs.join(manual_dir, "images")
  stat = directory_fingerprint(images)
  known = known_images or {}
  if stat is not None and known.get("stat") == stat and known.get("sha256"):
    out["images/"] = known["sha256"]
  else:
    out["images/"] = directory_sha256(images)
  return out, stat


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
  CSV_FILES = ("transactions_train.csv", "articles.csv")
  INTERACTIONS_CSV = "transactions_train.csv"
  ITEM_COLUMN = "article_id"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the Kaggle competition 'h-and-m-personalized-fashion-recommendations' and pass "
      "its directory (transactions_train.csv, articles.csv, images/) as data.manual_dir.")

  def _transactions(self, columns=("t_dat", "customer_id", "article_id")) -> dict[str, list]:
    """Columns of transactions_train.csv; ``t_dat`` as day ordinals."""
    return read_csv_columns(fs.join(self._dir(), "transactions_train.csv"), columns,
                            converters={"t_dat": parse_day},
                            nonempty=("customer_id", "article_id"))

  def _categories(self) -> dict[str, str]:
    """article_id -> product_type_name of articles.csv ({} if it is absent)."""
    path = fs.join(self._dir(), "articles.csv")
    if not fs.exists(path):
      return {}
    cols = read_csv_columns(path, ("article_id", "product_type_name"), nonempty=("article_id",),
                            unique="article_id")
    return dict(zip(cols["article_id"], cols["product_type_name"]))

  def check_sources(self):
    self.image_paths(sorted(set(self._transactions()["article_id"])))
    self._categories()

  def _image_relpaths(self, item_id):
    return (os.path.join(item_id[:3], item_id + ".jpg"),)

  def read_interactions(self):
    cols = self._transactions()
    rows = zip(cols["customer_id"], cols["article_id"], cols["t_dat"],
               [1.0] * len(cols["t_dat"]))
    yield from _group_by_user(rows)

  def item_sources(self):
    items = sorted(set(self._transactions(("article_id",))["article_id"]))
    categories = self._categories()
    paths = self.image_paths(items)
    return [(a, categories.get(a, ""), paths[a]) for a in items]


class FolderDataset(_VarsBuilder):
  """Generic folder: interactions.csv, images/<item_id>.<ext>, optional items.csv."""

  BUILDER_CONFIGS = []
  CSV_FILES = ("interactions.csv", "items.csv")
  INTERACTIONS_CSV = "interactions.csv"
  ITEM_COLUMN = "item_id"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass a directory with interactions.csv (user_id,item_id[,timestamp][,rating]), "
      "images/<item_id>.jpg|jpeg|png and optionally items.csv (item_id,category) as "
      "data.manual_dir.")

  def _interactions(self, columns=("user_id", "item_id"),
                    optional=("timestamp", "rating")) -> dict[str, list]:
    """Columns of interactions.csv; ``timestamp`` as seconds (-1: none), ``rating`` floats."""
    return read_csv_columns(fs.join(self._dir(), "interactions.csv"), columns, optional,
                            converters={"timestamp": parse_timestamp, "rating": parse_rating},
                            nonempty=("user_id", "item_id"))

  def _categories(self) -> dict[str, str]:
    """item_id -> category of items.csv ({} if it is absent)."""
    path = fs.join(self._dir(), "items.csv")
    if not fs.exists(path):
      return {}
    cols = read_csv_columns(path, ("item_id", "category"), nonempty=("item_id",),
                            unique="item_id")
    return dict(zip(cols["item_id"], cols["category"]))

  def check_sources(self):
    self.image_paths(sorted(set(self._interactions()["item_id"])))
    self._categories()

  def _image_relpaths(self, item_id):
    return tuple(item_id + ext for ext in _IMAGE_EXTENSIONS)

  def read_interactions(self):
    cols = self._interactions()
    n = len(cols["user_id"])
    stamps = cols.get("timestamp", [-1] * n)
    ratings = cols.get("rating", [1.0] * n)
    yield from _group_by_user(zip(cols["user_id"], cols["item_id"], stamps, ratings))

  def item_sources(self):
    items = sorted(set(self._interactions(("item_id",), ())["item_id"]))
    categories = self._categories()
    paths = self.image_paths(items)  # <id>.jpg is reported as missing if none exists.
    return [(item, categories.get(item, ""), paths[item]) for item in items]


BUILDERS = {"synthetic": SyntheticFashion, "hm": HMFashion, "folder": FolderDataset}
