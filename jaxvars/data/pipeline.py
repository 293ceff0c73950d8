"""From a data config to arrays: prepare the tfds tables, binarise, filter, split.

``load(data_config, workdir)`` returns a :class:`RecData`. The split (train pairs,
held-out items, evaluation negatives) is saved to ``<workdir>/split.npz`` the
first time and read back afterwards, so that evaluation ranks exactly the same
candidates as training did.

Nothing stale is reused silently. The prepared tfds tables are named after the
content of their source files (sha256 of each CSV and of every photo under
``images/``) and the settings that shape them, so a changed file prepares them
again and a copied or touched one does not; ``<tfds_dir>/jaxvars_sources.json`` keeps
the last fingerprint of each manual directory, so that the log says once which files
changed, and the image tree's stat fingerprint, so that its photos are hashed again only
when a size or mtime changed. ``split.npz``
stores the sha256 of the CSV files it was made from and refuses other ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import numbers
import os
import tempfile
import time
import zipfile

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxvars import atomic, fs, locking
from jaxvars.data import builders, splits
from jaxvars.errors import ConfigError, DataError, JaxvarsError
from jaxvars.progress import progress

SPLIT_FILE = "split.npz"
# config.data.image_store: where the catalogue's decoded photos live during a run.
IMAGE_STORES = ("auto", "memory", "mmap")
# 'auto' maps the photos from disk when they would take more than this share of the host's
# physical memory (a catalogue of 10^6 photos at 224 px is 150 GB), else holds them in memory.
AUTO_MMAP_SHARE = 0.25
PIXELS_PREFIX = "jaxvars_pixels-"  # <images table dir>/jaxvars_pixels-<item ids>.npy
SOURCES_INDEX = "jaxvars_sources.json"  # In the tfds directory: last fingerprint of each source.
_WHITE = (255, 255, 255)


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


def background(data_config) -> tuple[int, int, int]:
  """``config.data.background``: the RGB colour behind transparent pixels.

  Returns:
    (r, g, b), ints in 0..255; white if the field is absent (an older config).

  Raises:
    ConfigError: naming config.data.background unless it is 3 ints in 0..255.
  """
  value = data_config.get("background", _WHITE)
  if not (isinstance(value, (tuple, list)) and len(value) == 3
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255
                  for v in value)):
    raise ConfigError(f"config.data.background={value!r} must be 3 ints in 0..255 (RGB), "
                      "e.g. (255, 255, 255)")
  return tuple(int(v) for v in value)


def _builder_class(data_config) -> type:
  if data_config.name not in builders.BUILDERS:
    raise ConfigError(f"config.data.name={data_config.name!r} is not one of "
                      f"{tuple(builders.BUILDERS)}")
  return builders.BUILDERS[data_config.name]


def _manual_dir(data_config) -> str:
  manual = fs.expand(data_config.manual_dir)  # A gs:// URI as it is.
  if not fs.isdir(manual):
    raise DataError(f"data.manual_dir {data_config.manual_dir!r} ({manual}) is not a directory")
  return manual


def _tfds_root(data_config) -> str:
  """The tfds data directory: ``data.tfds_dir``, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets (tfds's own default)."""
  return fs.expand(data_config.tfds_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))


def _source_files(data_config) -> dict:
  """Fingerprints of the source files ({} for synthetic): :func:`builders.source_files`,
  with the image tree's stat fingerprint and content hash remembered in the tfds
  directory's index (``images_stat``), so that its photos are read only after a change."""
  if not _builder_class(data_config).CSV_FILES:
    return {}
  manual = _manual_dir(data_config)
  root, key = _tfds_root(data_config), _index_key(data_config)
  entry = _read_index(root).get(key)
  known = entry.get("images_stat") if isinstance(entry, dict) else None
  start = time.perf_counter()
  files, stat = builders.source_files(data_config.name, manual,
                                      known_images=known if isinstance(known, dict) else None)
  seconds = time.perf_counter() - start
  if stat is not None and (not isinstance(known, dict) or known.get("stat") != stat):
    logging.info("%s: hashed the photos under images/ in %.1f s (new or changed sizes or "
                 "mtimes)", manual, seconds)
    _write_index(root, key, {"images_stat": {"stat": stat, "sha256": files["images/"]}},
                 merge=True)
  else:
    logging.debug("fingerprinted %s in %.2f s", manual, seconds)
  return files


def _source(data_config, table: str, files: dict | None = None) -> dict:
  """The source description of one table, hashed into its tfds config name.

  ``interactions`` depends on the interactions CSV only; ``images`` on every CSV,
  the image tree, ``missing_images`` and ``background``.

  Args:
    data_config: ``config.data``.
    table: 'interactions' or 'images'.
    files: :func:`_source_files` of ``data_config`` (computed if None).
  """
  cls = _builder_class(data_config)
  if data_config.name == "synthetic":
    s = data_config.synthetic
    return {"num_users": int(s.num_users), "num_items": int(s.num_items),
            "mean_interactions": float(s.mean_interactions), "seed": int(s.seed)}
  manual = _manual_dir(data_config)
  if files is None:
    files = _source_files(data_config)
  if table == "interactions":
    return {"manual_dir": manual, "files": {cls.INTERACTIONS_CSV: files[cls.INTERACTIONS_CSV]}}
  return {"manual_dir": manual, "missing_images": data_config.missing_images,
          "background": list(background(data_config)), "files": dict(files)}


def _builder(data_config, table: str, files: dict | None = None) -> tfds.core.DatasetBuilder:
  cls = _builder_class(data_config)
  config = builders.VarsConfig(table=table, image_size=int(data_config.image_size),
                               source=_source(data_config, table, files))
  try:
    return cls(config=config, data_dir=data_config.tfds_dir or None, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (a damaged dataset_info.json, ...)
    directory = fs.join(_tfds_root(data_config), cls.name, config.name)
    if not fs.isdir(directory):
      raise
    text = " ".join(str(e).split())[:200]
    raise DataError(f"{directory}: the prepared {table} table cannot be opened "
                    f"({type(e).__name__}: {text}); delete that directory and rerun to prepare "
                    "it again") from None


def _short(files: dict) -> str:
  """One sha256 of all source file fingerprints, 12 hex digits, for log lines."""
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]


def _remove_incomplete(builder) -> None:
  """Removes tfds's partly written directories of ``builder`` and empty parents."""
  config_dir = builder.data_path.parent
  for path in fs.glob(fs.join(config_dir, "incomplete.*")):
    fs.rmtree(path, ignore_errors=True)
  if not fs.is_local(config_dir):
    return  # An object store has no empty directories to remove.
  for d in (config_dir, config_dir.parent):
    try:
      os.rmdir(os.fspath(d))  # Only if empty.
    except OSError:
      break


def _run_cleanly(builder, fn) -> None:
  """Runs ``fn()``; on failure removes half-written output, raises the first JaxvarsError.

  The first :class:`JaxvarsError` in the exception chain (tfds wraps errors raised
  while generating examples) is raised in place of the wrapper; a full disk or a directory
  that cannot be written becomes a :class:`DataError` naming the table's directory.
  """
  try:
    fn()
  except BaseException as e:
    _remove_incomplete(builder)
    cause = e
    while cause is not None and not isinstance(cause, JaxvarsError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None and cause is not e:
      raise cause from None
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      raise DataError(f"{builder.data_dir}: cannot write the prepared table there "
                      f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}); its "
                      "partly written files were removed; free some space or choose another "
                      "config.data.tfds_dir, then rerun") from None
    raise


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _check_writable(root: str, data_config) -> None:
  """Raises DataError naming ``config.data.tfds_dir`` unless tables can be written in ``root``."""
  try:
    fs.makedirs(root, exist_ok=True)
    if fs.is_local(root):
      fd, probe = tempfile.mkstemp(dir=root, prefix=".jaxvars_write_check.")
      os.close(fd)
      os.unlink(probe)
    else:
      probe = fs.join(root, f".jaxvars_write_check.{os.urandom(6).hex()}")
      with fs.open(probe, "wb"):
        pass
      fs.remove(probe)
  except OSError as e:
    raise DataError(f"config.data.tfds_dir={data_config.tfds_dir!r} ({root}): cannot write the "
                    f"prepared tables there ({e.strerror or e}); choose a writable directory "
                    "(or, with tfds_dir '', set $TFDS_DATA_DIR)") from None


def _damaged_table(builder, e: BaseException) -> DataError:
  """The DataError of a prepared table that cannot be read back (truncated, corrupted)."""
  text = " ".join(str(e).split())[:200]
  return DataError(f"{builder.data_dir}: the prepared {builder.builder_config.table} table is "
                   f"damaged ({type(e).__name__}: {text}); delete that directory and rerun to "
                   "prepare it again")


def _is_prepared(builder) -> bool:
  """Whether tfds finished the table (``builder.is_prepared()`` without its warning
  about a missing directory)."""
  return fs.exists(fs.join(builder.data_dir, "dataset_info.json"))


def _index_key(data_config) -> str:
  return f"{data_config.name}:{_manual_dir(data_config)}"


def _read_index(root: str) -> dict:
  path = fs.join(root, SOURCES_INDEX)
  try:
    with fs.open(path, encoding="utf-8") as f:
      index = json.load(f)
    return index if isinstance(index, dict) else {}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s); starting a new one", path, e)
    return {}


def _write_index(root: str, key: str, entry: dict, *, merge: bool = False) -> None:
  """Sets ``key`` of ``<root>/jaxvars_sources.json`` to ``entry`` (with ``merge``: updates
  its fields with ``entry``'s) (atomic replace; a concurrent writer may lose its entry,
  which costs only a log line or a second hashing of the photos)."""
  path = fs.join(root, SOURCES_INDEX)
  try:
    fs.makedirs(root, exist_ok=True)
    index = _read_index(root)
    old = index.get(key)
    index[key] = dict(old, **entry) if merge and isinstance(old, dict) else entry
    if not fs.is_local(root):
      with atomic.atomic_file(path, "w", encoding="utf-8", every_process=True) as f:
        json.dump(index, f, indent=1, sort_keys=True)  # Written by whoever prepared.
      return
    fd, tmp = tempfile.mkstemp(dir=root, prefix=SOURCES_INDEX + ".", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    logging.warning("cannot update %s (%s); source changes will not be reported", path, e)


def _changed(old: dict, new: dict) -> list[str]:
  """Names whose fingerprint differs between two :func:`_source_files` dicts."""
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _prepare_tables(data_config, files: dict) -> dict:
  """Prepares the interactions and images tables where needed.

  Source CSV files are fingerprinted (every load) and fully checked before any
  table is written (only when one must be prepared). A manual-directory source
  whose files changed since it was last prepared into this tfds directory is
  reported once in the log (``<tfds_dir>/jaxvars_sources.json`` keeps the last
  fingerprint of each source).

  Args:
    data_config: ``config.data``.
    files: :func:`_source_files` of ``data_config``.

  Returns:
    {table: prepared builder}.

  Raises:
    DataError: a missing or malformed source file (named, with its line).
    ConfigError: an unknown data.name or a bad data.background.
  """
  built = {t: _builder(data_config, t, files) for t in ("interactions", "images")}
  pending = [b for b in built.values() if not _is_prepared(b)]
  if not pending:
    return built
  root = _tfds_root(data_config)
  _check_writable(root, data_config)
  # One preparation per table at a time (a second run waits, then reuses the table).
  with locking.preparing(root, [(b.name, b.builder_config.name) for b in pending]):
    built = {t: _builder(data_config, t, files) for t in ("interactions", "images")}
    pending = [b for b in built.values() if not _is_prepared(b)]
    if pending:
      _prepare_pending(data_config, files, root, built, pending)
    else:
      logging.info("another run prepared %s meanwhile; reusing it",
                   ", ".join(f"{b.name}/{b.builder_config.name}" for b in built.values()))
  return built


def _prepare_pending(data_config, files: dict, root: str, built: dict, pending: list) -> None:
  """The body of :func:`_prepare_tables` under its preparation locks: checks the sources,
  prepares each table of ``pending`` and records the source in the tfds directory's index."""
  if files:
    key = _index_key(data_config)
    last = _read_index(root).get(key)
    if isinstance(last, dict) and isinstance(last.get("files"), dict):
      changed = _changed(last["files"], files)
      if changed:
        logging.info("%s: source files changed since the last preparation (%s, %s): %s; "
                     "preparing again", _manual_dir(data_config),
                     ", ".join(sorted(last.get("configs", {}).values())),
                     last.get("prepared", "?"), ", ".join(changed))
  for b in pending:
    logging.info("preparing %s/%s (source fingerprint %s)", b.name, b.builder_config.name,
                 _short(files) if files else "generated")
  _run_cleanly(pending[0], pending[0].check_sources)  # Every CSV checked before any writing.
  for b in pending:
    _run_cleanly(b, b.download_and_prepare)
  if files:
    _write_index(root, key, {
        "files": files, "prepared": datetime.datetime.now().isoformat(timespec="seconds"),
        "configs": {t: f"{b.name}/{b.builder_config.name}" for t, b in built.items()}},
        merge=True)


def _read_tables(data_config, files: dict):
  """Reads the prepared tables back.

  Raises:
    DataError: naming a table's directory when it cannot be read (truncated, corrupted).
  """
  built = _prepare_tables(data_config, files)
  users, items, stamps, ratings = [], [], [], []
  image_index = {}
  categories = {}
  builder = built["interactions"]
  try:
    inter = builder.as_data_source(split="train")
    for k in progress(range(len(inter)), desc="read interactions", total=len(inter)):
      r = inter[k]
      n = len(r["item_ids"])
      if not len(r["timestamps"]) == len(r["ratings"]) == n:
        raise ValueError(f"example {k} holds {n} items, {len(r['timestamps'])} timestamps")
      users.extend([r["user_id"].decode()] * n)
      items.extend(x.decode() for x in r["item_ids"])
      stamps.append(r["timestamps"])
      ratings.append(r["ratings"])
    builder = built["images"]
    imgs = builder.as_data_source(split="train")
    for k in progress(range(len(imgs)), desc="index images", total=len(imgs)):
      r = imgs[k]
      item = r["item_id"].decode()
      image_index[item] = k
      categories[item] = r["category"].decode()
  except JaxvarsError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (anything a damaged table raises)
    raise _damaged_table(builder, e) from None
  imgs = _CheckedImages(imgs, builder)
  stamps = np.concatenate(stamps) if stamps else np.zeros(0, np.int64)
  ratings = np.concatenate(ratings) if ratings else np.zeros(0, np.float32)
  return np.array(users), np.array(items), stamps, ratings, imgs, image_index, categories


class _CheckedImages:
  """The images table's data source; a record that cannot be read is a named DataError."""

  def __init__(self, source, builder):
    self._source, self._builder = source, builder
    self._shape = (builder.builder_config.image_size,) * 2 + (3,)

  @property
  def data_dir(self) -> str:
    """The prepared table's directory (its name holds the source fingerprint)."""
    return str(self._builder.data_dir)

  @property
  def config_name(self) -> str:
    return str(self._builder.builder_config.name)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, k: int) -> dict:
    try:
      r = self._source[k]
      image = np.asarray(r["image"])
      if image.shape != self._shape or image.dtype != np.uint8:
        raise ValueError(f"example {k} holds a {image.dtype} image of shape {image.shape}")
    except Exception as e:  # pylint: disable=broad-except
      raise _damaged_table(self._builder, e) from None
    return r


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
    DataError: a missing or malformed file (named, with its line), too few users or
      items, or ``workdir`` holds a split made from other source files.
    ConfigError: ``workdir`` holds a split made with other data settings, or a
      data field is invalid (name, background).
  """
  background(data_config)
  files = _source_files(data_config)
  split_source = _split_source(files)
  _check_stored_split(data_config, workdir, split_source)  # Before any preparing.
  users_s, items_s, stamps, ratings, imgs, image_index, categories = _read_tables(data_config,
                                                                                 files)
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
  missing_stamps = int((t == builders.MISSING_TIMESTAMP).sum())
  has_timestamps = bool(len(t)) and not missing_stamps

  split = _load_or_make_split(data_config, workdir, u, i, t, user_ids, item_ids, has_timestamps,
                              split_source)
  if image_store(data_config, len(item_ids)) == "mmap":
    images = _mapped_pixels(data_config, imgs, image_index, item_ids)
  else:
    images = np.stack([imgs[image_index[item]]["image"]
                       for item in progress(item_ids, desc="load images", total=len(item_ids))])
  return RecData(name=data_config.name, user_ids=user_ids, item_ids=item_ids,
                 categories=np.array([categories[x] for x in item_ids]), images=images,
                 has_timestamps=has_timestamps, **split)


def host_memory_bytes() -> int:
  """The host's physical memory in bytes (0 where the OS does not say)."""
  try:
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
  except (AttributeError, ValueError, OSError):
    return 0


def image_store(data_config, num_items: int) -> str:
  """Where a run keeps the decoded photos of its ``num_items`` items: 'memory' (one uint8
  array [I, S, S, 3]) or 'mmap' (a ``.npy`` beside the prepared images table, written once
  from it and memory-mapped: the OS pages in the photos the batches read, so host memory
  holds the batches in flight, not the catalogue). ``config.data.image_store='auto'`` (the
  default) chooses 'mmap' when the catalogue exceeds ``AUTO_MMAP_SHARE`` of the host's
  physical memory.

  Raises:
    ConfigError: naming config.data.image_store unless it is one of ``IMAGE_STORES``.
  """
  mode = data_config.get("image_store", "auto")
  if mode not in IMAGE_STORES:
    raise ConfigError(f"config.data.image_store={mode!r} is not one of {IMAGE_STORES}")
  if mode != "auto":
    return mode
  need = int(num_items) * int(data_config.image_size) ** 2 * 3
  total = host_memory_bytes()
  return "mmap" if total and need > AUTO_MMAP_SHARE * total else "memory"


def _mapped_pixels(data_config, imgs, image_index: dict, item_ids) -> np.ndarray:
  """The photos of ``item_ids`` (in that order) as a read-only memory map of
  ``<images table dir>/jaxvars_pixels-<sha256 of the item ids>.npy`` (or under
  ``config.data.mmap_dir``), written from the images table the first time (in item order,
  one photo at a time, to a temporary file renamed when complete; concurrent runs wait on
  a lock and reuse it). The table's directory name holds the source fingerprint, so a
  changed photo gets another directory, hence another file.

  Raises:
    ConfigError: the directory is not local (a memory map needs a local file; set
      config.data.mmap_dir).
    DataError: as reading the images table.
  """
  directory = data_config.get("mmap_dir", "") or imgs.data_dir
  directory = fs.expand(directory)
  if not fs.is_local(directory):
    raise ConfigError(f"config.data.image_store='mmap' maps the photos from a local file, and "
                      f"{directory} is not local; set config.data.mmap_dir to a local directory")
  s = int(data_config.image_size)
  shape = (len(item_ids), s, s, 3)
  h = hashlib.sha256(str(imgs.config_name).encode())
  for item in item_ids:
    h.update(str(item).encode() + b"\n")
  path = os.path.join(directory, f"{PIXELS_PREFIX}{h.hexdigest()[:20]}.npy")
  pixels = _open_pixels(path, shape)
  if pixels is not None:
    return pixels
  with locking.preparing(directory, [("pixels", os.path.basename(path))]):
    pixels = _open_pixels(path, shape)
    if pixels is None:
      with atomic.atomic_path(path, every_process=True) as tmp:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for k, item in enumerate(progress(item_ids, desc="map images", total=len(item_ids))):
          target[k] = imgs[image_index[item]]["image"]
        target.flush()
        del target
      pixels = _open_pixels(path, shape)
  if pixels is None:
    raise DataError(f"{path}: written but not readable back as uint8 {list(shape)}")
  logging.info("photos memory-mapped from %s (%.2f GB; config.data.image_store)", path,
               np.prod(shape) / 1e9)
  return pixels


def _open_pixels(path: str, shape) -> np.ndarray | None:
  """The memory map at ``path`` if it holds uint8 ``shape``; None where it is absent, or
  (with a warning naming it) damaged or of another shape."""
  try:
    pixels = np.load(path, mmap_mode="r", allow_pickle=False)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:  # Truncated (mmap past the end), bad header.
    logging.warning("%s cannot be read (%s); writing it again", path, e)
    return None
  if pixels.shape != tuple(shape) or pixels.dtype != np.uint8:
    logging.warning("%s holds %s %s, expected uint8 %s; writing it again", path, pixels.dtype,
                    list(pixels.shape), list(shape))
    return None
  return pixels


def _split_source(files: dict) -> dict:
  """The source fingerprints a stored split must match: the CSV files' sha256.

  The fingerprint of ``images/`` is left out: photos do not shape the split (an item whose photo went
  missing under missing_images='drop' changes the item ids, which are checked).
  """
  return {k: v for k, v in files.items() if k != "images/"}


def _check_stored_split(data_config, workdir, split_source: dict) -> None:
  """Checks a stored split against this run's data settings and source files.

  Raises:
    ConfigError: naming split.npz if it was made with other data settings.
    DataError: naming split.npz and the source files changed since it was made.
  """
  path = fs.join(workdir, SPLIT_FILE) if workdir else None
  if not (path and fs.exists(path)):
    return
  fingerprint = _fingerprint(data_config)
  z = _read_split(path)
  stored = str(z["fingerprint"])
  if stored != fingerprint:
    raise ConfigError(f"{path} was made with other data settings ({stored}) than this run's "
                      f"({fingerprint}); use a fresh --workdir")
  if "source" not in z:
    if split_source:
      logging.warning("%s was made before source fingerprints were stored; cannot check that "
                      "%s are unchanged since", path, ", ".join(sorted(split_source)))
    return
  old = json.loads(str(z["source"]))
  changed = _changed(old, split_source)
  if changed:
    what = "; ".join(_describe_change(k, old.get(k), split_source.get(k)) for k in changed)
    raise DataError(f"{path}: source files changed since this split was made: {what}; "
                    "use a fresh --workdir")


def _read_split(path: str) -> dict:
  """Every array of a stored split.npz, read at once, with a damaged file named.

  Raises:
    DataError: naming ``path`` when it is truncated or is not a split this code wrote.
  """
  rebuild = ("delete it and rerun to rebuild it (the same data and config.data.split_seed "
             "give the same split)")
  try:
    with fs.np_load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
    raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); {rebuild}") from None
  missing = {"fingerprint", "user_ids", "item_ids", "train_users", "train_items", "test_items",
             "eval_negatives"} - set(arrays)
  if missing:
    raise DataError(f"{path} lacks {sorted(missing)}: not a split jaxvars wrote; {rebuild}")
  return arrays


def _describe_change(name: str, old: str | None, new: str | None) -> str:
  """'interactions.csv changed (sha256 0a1b2c3d4e5f -> ...)', 'items.csv appeared', ..."""
  if old is None:
    return f"{name} appeared"
  if new is None:
    return f"{name} is gone"
  return f"{name} changed (sha256 {old[:12]} -> {new[:12]})"


def _load_or_make_split(data_config, workdir, u, i, t, user_ids, item_ids, has_timestamps,
                        split_source: dict):
  """The stored split of ``workdir`` (checked by :func:`_check_stored_split` first)
  or a new one, stored there with the data settings, ids and source fingerprints."""
  path = fs.join(workdir, SPLIT_FILE) if workdir else None
  fingerprint = _fingerprint(data_config)
  if path and fs.exists(path):
    z = _read_split(path)
    if not (np.array_equal(z["user_ids"], user_ids) and np.array_equal(z["item_ids"], item_ids)):
      raise DataError(f"{path}: the dataset's users or items changed since this split was made; "
                      "use a fresh --workdir")
    return {k: z[k] for k in ("train_users", "train_items", "test_items", "eval_negatives")}
  if data_config.split == "time" and not has_timestamps:
    missing = int((t == builders.MISSING_TIMESTAMP).sum())
    raise ConfigError(f"config.data.split='time' but dataset {data_config.name!r} has {missing} "
                      f"of {len(t)} interactions without timestamps (an empty timestamp cell or "
                      "-1); fill them in or use 'random'")
  rng = np.random.default_rng(int(data_config.split_seed))
  counts = np.bincount(u, minlength=len(user_ids))
  if counts.min(initial=2) < 2:
    raise ConfigError(f"config.data.min_user_interactions={data_config.min_user_interactions} "
                      f"keeps user {str(user_ids[int(np.argmin(counts))])!r} with "
                      f"{int(counts.min())} distinct item; leave-one-out holds one item out and "
                      "trains on the rest, so it needs >= 2")
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
    fs.makedirs(workdir, exist_ok=True)
    atomic.write_npz(path, dict(fingerprint=np.array(fingerprint), user_ids=user_ids,
                                item_ids=item_ids,
                                source=np.array(json.dumps(split_source, sort_keys=True)),
                                **split), compressed=False)
  return split
