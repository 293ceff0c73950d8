"""The raw files of a dataset: photo names resolved inside the dataset folder, content
fingerprints of files and folders, and CSV reading with the checks that name a bad file,
line or value (:mod:`jaxvars.data.builders` prepares tables from them)."""

from __future__ import annotations

import csv
import datetime
import hashlib
import math
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence

from jaxvars import fs
from jaxvars.errors import DataError

_HASH_CHUNK = 1 << 20  # Bytes read at a time when hashing a file.

class OutsideError(ValueError):
  """A photo's name that resolves outside the dataset folder (the message says how)."""


def _real_bases(manual_dir: str, image_dir: str) -> tuple[str, ...]:
  """The real paths a photo may resolve into: the dataset folder and its ``images/`` (which
  may be a link to another disk). A non-local folder (``gs://``) has no links: itself."""
  if not fs.is_local(manual_dir):
    return (fs.fspath(manual_dir), fs.fspath(image_dir))
  return tuple(dict.fromkeys(os.path.realpath(d) for d in (manual_dir, image_dir)))


def resolve_inside(image_dir: str, relative: str, bases: Sequence[str] | None = None) -> str:
  """``<image_dir>/<relative>`` if it lies inside ``image_dir`` by name and, links resolved
  (``os.path.realpath``), inside one of ``bases`` (default: ``image_dir``'s real path).

  Returns:
    the joined path (not resolved; it need not exist).

  Raises:
    OutsideError: ``relative`` is absolute, holds a NUL byte, leads out of ``image_dir``
      by '..', or names (or passes through) a link to a place outside ``bases``.
  """
  if "\0" in relative:
    raise OutsideError("it holds a NUL byte")
  if os.path.isabs(relative):
    raise OutsideError("it is an absolute path")
  if not fs.is_local(image_dir):  # An object store: no links; by name only.
    top = fs.fspath(image_dir).rstrip("/")
    lexical = posixpath.normpath(relative)
    if lexical == ".." or lexical.startswith("../"):
      raise OutsideError(f"it leads to {posixpath.join(top, lexical)}")
    return posixpath.join(top, relative)
  top = os.path.abspath(image_dir)
  path = os.path.join(image_dir, relative)
  lexical = os.path.normpath(os.path.join(top, relative))
  if os.path.commonpath([top, lexical]) != top:
    raise OutsideError(f"it leads to {lexical}")
  real = os.path.realpath(path)
  bases = tuple(bases) if bases else (os.path.realpath(image_dir),)
  if not any(os.path.commonpath([b, real]) == b for b in bases):
    raise OutsideError(f"{path} is, or passes through, a link to {real}")
  return path


def csv_line(path: str, column: str, value: str) -> int | None:
  """The line where the first row of the CSV file ``path`` whose ``column`` (stripped) is
  ``value`` starts; None if there is none or the file cannot be read."""
  try:
    with fs.open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = [h.strip() for h in next(reader, [])]
      if column not in header:
        return None
      k = header.index(column)
      start = reader.line_num + 1
      for row in reader:
        if len(row) > k and row[k].strip() == value:
          return start
        start = reader.line_num + 1
  except (OSError, UnicodeDecodeError, csv.Error):
    return None
  return None


def file_sha256(path: str) -> str | None:
  """sha256 (hex) of a file's bytes; None if it does not exist.

  Raises:
    DataError: naming ``path`` if it exists but cannot be read.
  """
  digest = hashlib.sha256()
  try:
    with fs.open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
  except FileNotFoundError:
    return None
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
  return digest.hexdigest()


def _tree_files(path: str) -> list[tuple[str, os.DirEntry | None]]:
  """(relative path, entry) of every file under ``path``, sorted; entry None for a dangling
  link. Linked directories are followed (each real directory once).

  Raises:
    DataError: naming a directory that cannot be listed.
  """
  files, stack, seen = [], [""], set()
  while stack:
    rel = stack.pop()
    here = os.path.join(path, rel)
    try:
      st = os.stat(here)
      if (st.st_dev, st.st_ino) in seen:
        continue
      seen.add((st.st_dev, st.st_ino))
      with os.scandir(here) as it:
        for e in it:
          name = os.path.join(rel, e.name) if rel else e.name
          if e.is_dir():
            stack.append(name)
          else:
            files.append((name, e if os.path.exists(e.path) else None))
    except OSError as err:
      raise DataError(f"{here}: cannot list the directory ({err.strerror or err})") from None
  return sorted(files, key=lambda f: f[0])


def _remote_tree_files(path: str) -> list[tuple[str, str]]:
  """(relative path, full path) of every file under the non-local folder ``path``, sorted.

  Raises:
    DataError: naming ``path`` when it cannot be listed.
  """
  try:
    return fs.tree_files(path)
  except OSError as err:
    raise DataError(f"{path}: cannot list the directory ({err.strerror or err})") from None


def _digest(lines: list[str]) -> str:
  return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def directory_fingerprint(path: str) -> str | None:
  """A cheap fingerprint of a directory tree: sha256 of its sorted
  (relative path, size in bytes, mtime in ns) for every file; stat only, no reads.
  It changes when a file is merely touched or copied; :func:`directory_sha256` does not.

  Returns:
    hex digest, or None if ``path`` is not a directory.

  Raises:
    DataError: naming a directory that cannot be listed.
  """
  if not fs.isdir(path):
    return None
  lines = []
  if not fs.is_local(path):  # Object stores give sizes and mtimes in seconds.
    for name, full in _remote_tree_files(path):
      size, mtime = fs.stat_signature(full)
      lines.append(f"{name}\t{size}\t{int(mtime * 1_000_000_000)}")
    return _digest(lines)
  for name, entry in _tree_files(path):
    try:
      info = entry.stat() if entry is not None else None
    except OSError:
      info = None
    lines.append(f"{name}\t-\t-" if info is None else f"{name}\t{info.st_size}\t{info.st_mtime_ns}")
  return _digest(lines)


def directory_sha256(path: str) -> str | None:
  """A content fingerprint of a directory tree: sha256 of its sorted (relative path, sha256
  of the file's bytes) for every file (reads every file: seconds for a catalogue of
  photos such as H&M's).

  Returns:
    hex digest, or None if ``path`` is not a directory.

  Raises:
    DataError: naming a directory that cannot be listed or a file that cannot be read.
  """
  if not fs.isdir(path):
    return None
  lines = []
  if not fs.is_local(path):
    for name, full in _remote_tree_files(path):
      lines.append(f"{name}\t{file_sha256(full) or '-'}")
    return _digest(lines)
  for name, entry in _tree_files(path):
    digest = None if entry is None else file_sha256(entry.path)
    lines.append(f"{name}\t{digest or '-'}")
  return _digest(lines)


def _utf8_error(path: str) -> DataError:
  """The DataError for the first line of ``path`` that is not valid UTF-8."""
  with fs.open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        bad = line[e.start:e.end]
        return DataError(f"{path}: line {lineno} is not UTF-8 (byte(s) {bad.hex(' ')} at column "
                         f"{e.start + 1}); save the file as UTF-8")
  return DataError(f"{path}: is not UTF-8; save the file as UTF-8")


def _show(value: str, limit: int = 40) -> str:
  """repr of a CSV value for a message, shortened to about ``limit`` characters."""
  return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


def read_csv_columns(path: str, required: Sequence[str], optional: Sequence[str] = (), *,
                     converters: Mapping[str, Callable[[str], object]] | None = None,
                     nonempty: Sequence[str] = (), unique: str | None = None) -> dict[str, list]:
  """Reads the named columns of a CSV file, checking every row.

  The file must be UTF-8 (a leading byte-order mark is skipped), start with a
  header naming each column once and hold at least one row; every non-blank row must
  have the header's number of fields. Values are stripped of surrounding spaces. A problem
  is reported at the line where its row starts (a row whose quoted field runs over several
  lines, e.g. from an unbalanced quote, is named by its first line, and the message says
  where it ends).

  Args:
    path: the CSV file.
    required: columns that must be in the header.
    optional: columns read when present.
    converters: column -> function of the stripped string; it raises ValueError
      whose message completes "<column> '<value>' ..." (e.g. "is not a number").
    nonempty: columns whose value must not be empty.
    unique: a column whose values must all differ (an id of a one-row-per-id file).

  Returns:
    dict column -> list (str, or the converter's values) for every required
    column and each optional one present, one entry per non-blank row.

  Raises:
    DataError: naming ``path`` (and line) if it is missing, not UTF-8, empty, has
      no rows, lacks a required column or names a column twice, has a row with another
      number of fields than the header, or a value that is empty, repeats a ``unique``
      value or its converter rejects.
  """
  converters = converters or {}
  try:
    f = fs.open(path, newline="", encoding="utf-8-sig")
  except FileNotFoundError:
    raise DataError(f"{path}: file is missing") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
  expected = (f"{','.join(required)}" + "".join(f"[,{c}]" for c in optional))
  start = 1  # The line where the row being read starts.
  try:
    with f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path} has no rows (the file is empty); expected a header "
                        f"{expected} and at least one row")
      header = [h.strip() for h in header]
      twice = sorted({h for h in header if h and header.count(h) > 1})
      if twice:
        where = [k + 1 for k, h in enumerate(header) if h == twice[0]]
        raise DataError(f"{path}:1: the header names column {twice[0]!r} more than once (columns "
                        f"{', '.join(map(str, where))}); name each column once")
      missing = [c for c in required if c not in header]
      if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(required)}"
                        f"{' and optionally ' + str(list(optional)) if optional else ''}, "
                        f"found {header}")
      wanted = [c for c in (*required, *optional) if c in header]
      index = [header.index(c) for c in wanted]
      checks = [(c, k, converters.get(c), c in nonempty) for c, k in zip(wanted, index)]
      columns = {c: [] for c in wanted}
      appends = [columns[c].append for c in wanted]
      width = len(header)
      seen = {}  # unique's value -> its line.
      start = reader.line_num + 1  # The line where the next row starts.
      for row in reader:
        line, start = start, reader.line_num + 1
        # A row running over several lines: a quoted field holds line breaks.
        spans = (f" (this row runs on to line {reader.line_num}: is a quote '\"' on line {line} "
                 "left unclosed?)") if reader.line_num > line else ""
        if not row:
          continue
        if len(row) != width:
          hint = "; quote fields that contain a comma" if len(row) > width and not spans else ""
          raise DataError(f"{path}:{line}: {len(row)} fields, expected {width} as in "
                          f"the header{hint}{spans}")
        for (c, k, convert, needed), append in zip(checks, appends):
          value = row[k].strip()
          if needed and not value:
            raise DataError(f"{path}:{line}: {c} is empty{spans}")
          if c == unique:
            if value in seen:
              raise DataError(f"{path}:{line}: {c} {value!r} repeats line {seen[value]}; "
                              f"expected one row per {c}")
            seen[value] = line
          if convert is not None:
            try:
              value = convert(value)
            except ValueError as e:
              raise DataError(f"{path}:{line}: {c} {_show(value)} {e}{spans}") from None
          append(value)
  except UnicodeDecodeError:
    raise _utf8_error(path) from None
  except csv.Error as e:
    raise DataError(f"{path}:{start}: cannot parse the CSV row starting there ({e})") from None
  if not columns[wanted[0]]:
    raise DataError(f"{path} has no rows (only a header); expected at least one row of "
                    f"{expected}")
  return columns


MISSING_TIMESTAMP = -1  # A stored timestamp of -1 means unknown (an empty cell).
_MAX_TIMESTAMP = 2 ** 63 - 1  # Stored as int64.


def parse_timestamp(value: str) -> int:
  """Seconds since 1970 of a number or an ISO date/time (UTC if no zone); '' -> -1 (unknown).

  Negative values are dates before 1970 and valid; exactly -1 (the value stored for an empty
  cell, i.e. 1969-12-31 23:59:59 UTC) reads as unknown. Only the order of timestamps is used,
  so any unit (seconds, milliseconds, ...) works if the whole file uses it.

  Raises:
    ValueError: "is neither a number nor an ISO date/time" (also for NaN, infinity), or
      "is out of range" for a number outside the int64 range (|t| >= 2**63).
  """
  if value == "":
    return MISSING_TIMESTAMP
  try:
    number = float(value)
  except ValueError:
    pass
  else:
    if not math.isfinite(number):
      raise ValueError("is neither a number nor an ISO date/time")
    if abs(number) >= 2.0 ** 63:
      raise ValueError(f"is out of range: a number timestamp must lie within +-{_MAX_TIMESTAMP} "
                       "(a 64-bit integer of seconds since 1970, or of a smaller unit)")
    return int(number)
  try:
    dt = datetime.datetime.fromisoformat(value)
  except ValueError:
    raise ValueError("is neither a number nor an ISO date/time") from None
  if dt.tzinfo is None:
    dt = dt.replace(tzinfo=datetime.timezone.utc)
  return int(dt.timestamp())


def parse_rating(value: str) -> float:
  """A finite float.

  Raises:
    ValueError: for an empty cell, text, NaN or infinity (the message says which).
  """
  if value == "":
    raise ValueError("is empty; expected a number (fill it in or drop the row)")
  try:
    number = float(value)
  except ValueError:
    raise ValueError("is not a number") from None
  if not math.isfinite(number):
    raise ValueError("is not a finite number; fill it in or drop the row")
  return number


def parse_day(value: str) -> int:
  """Proleptic Gregorian ordinal (days) of a YYYY-MM-DD date.

  Raises:
    ValueError: "is not a YYYY-MM-DD date".
  """
  try:
    return datetime.date.fromisoformat(value).toordinal()
  except ValueError:
    raise ValueError("is not a YYYY-MM-DD date") from None
