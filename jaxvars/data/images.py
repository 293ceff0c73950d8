"""Decoding product photos with PIL: orient, flatten to RGB, pad to a square, resize.

Every photo becomes uint8 RGB the same way, whatever its file holds:

* EXIF orientation (phone photos) is applied first (``ImageOps.exif_transpose``).
* 16-bit grayscale ('I;16', 'I;16B', 'I;16L', 'I;16N', and 'I' holding 16-bit data)
  is scaled to 8 bits by the bit depth: round(v / 257), so 65535 -> 255 and
  30000 -> 117 (PIL's own ``convert`` clips such values to 255: pure white).
* Transparency (alpha in 'RGBA', 'LA', 'PA', 'RGBa', 'La'; a transparent palette
  index of 'P'; a transparent colour of 'L' / 'RGB' PNGs) is composited over a
  background colour, white by default (``config.data.background``).
* CMYK (JPEG, TIFF) goes through PIL's ``convert('RGB')``: PIL reads CMYK JPEGs with
  Adobe's inverted polarity, as browsers do (with or without the Adobe marker);
  embedded ICC profiles are not applied (no colour management).
* 32-bit float grayscale ('F', e.g. a float TIFF) is scaled by a white level read from
  its largest value: [0, 1] if every pixel is <= 1 (the usual float convention), else
  [0, 255] if <= 255, else [0, 65535] (16-bit data stored as floats, scaled like a 16-bit
  PNG) if <= 65535; negative values show as black. Larger values (HDR) have no known white
  level and NaN or infinity no meaning: such a photo is refused by name. (PIL's own
  ``convert`` takes floats as 0..255, so [0, 1] data would come out black.)
* Grayscale ('1', 'L') and other modes PIL converts ('YCbCr', ...) become RGB.

Size: a photo of more than :data:`MAX_PIXELS` pixels (as decoded: a JPEG decodes at a
reduced scale when it is much larger than the output) is refused by name rather than
decoded (PIL's decompression-bomb limit). A thin photo (e.g. 20000 x 10) is first
resized so that its padded square has a side of at most :data:`MAX_SQUARE_SIDE`, so
memory stays bounded; photos whose longer side is at most that are padded, then resized,
exactly as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxvars import fs
from jaxvars.errors import DataError

WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The largest photo decoded, in pixels (PIL's default Image.MAX_IMAGE_PIXELS, about 0.25 GiB
# as 8-bit RGB): 9459 x 9459, or a 61-megapixel camera's 9504 x 6336.
MAX_PIXELS = 89_478_485
# A non-square photo is padded to a square of at most this side before the final resize
# (uint8 RGB: 48 MiB); a longer one is resized to fit first.
MAX_SQUARE_SIDE = 4096


def load_image(path: str | os.PathLike, size: int,
               background: Sequence[int] = WHITE) -> np.ndarray:
  """Reads one photo, pads it to a square with its border colour, resizes it.

  Args:
    path: a JPEG, PNG or any other format PIL decodes, of any size, aspect, mode and
      bit depth (see the module docstring for how each mode becomes RGB).
    size: output height and width in pixels.
    background: RGB, 3 ints in 0..255, shown behind transparent pixels.

  Returns:
    uint8 array [size, size, 3], RGB, in display orientation.

  Raises:
    DataError: naming ``path`` if it is missing, cannot be decoded, has more than
      :data:`MAX_PIXELS` pixels or float pixels without a known white level.
  """
  try:
    # A non-local photo (gs://) is read into memory through epath; PIL reads the bytes.
    with Image.open(path if fs.is_local(path) else fs.open(path, "rb")) as img:
      img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger.
      _check_size(img.size, path)
      rawmode = _rawmode(img)
      img.load()
      try:
        ImageOps.exif_transpose(img, in_place=True)
      except Exception:  # pylint: disable=broad-except
        pass  # A broken EXIF block: keep the stored orientation.
      arr = _to_rgb(img, rawmode, background, path)
  except FileNotFoundError:
    raise DataError(f"{path}: image file is missing") from None
  except Image.DecompressionBombError as e:  # Beyond twice PIL's limit: refused by Image.open.
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    _check_size((int(pixels.group(1)), 1) if pixels else (MAX_PIXELS + 1, 1), path)
    raise DataError(f"{path}: cannot decode image ({e})") from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: cannot decode image ({e})") from None
  h, w = arr.shape[:2]
  if h != w:
    side = max(h, w)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    colour = np.median(border, axis=0).astype(np.uint8)
    limit = max(MAX_SQUARE_SIDE, size)
    if side > limit:  # Thin and long: shrink first, so that the square stays small.
      h, w = max(1, round(h * limit / side)), max(1, round(w * limit / side))
      arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS))
      side = max(h, w)
    square = np.empty((side, side, 3), np.uint8)
    square[...] = colour
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = arr
    arr = square
  if arr.shape[0] != size:
    arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
  return np.ascontiguousarray(arr, dtype=np.uint8)


def _check_size(size: tuple[int, int], path) -> None:
  """Raises DataError naming ``path`` if ``size`` (width, height) exceeds :data:`MAX_PIXELS`."""
  w, h = size
  if w * h > MAX_PIXELS:
    shape = f"{w} x {h} pixels" if h > 1 else f"{w} pixels"
    raise DataError(f"{path}: the image has {shape} ({w * h / 1e6:.1f} megapixels), more than "
                    f"the {MAX_PIXELS / 1e6:.1f} megapixels jaxvars decodes "
                    "(jaxvars.data.images.MAX_PIXELS); downscale the photo")


def _rawmode(img: Image.Image) -> str:
  """How the file stores its pixels ('I;16B', 'I;32S', ...), read before decoding."""
  try:
    args = img.tile[0].args if img.tile else None
  except (AttributeError, IndexError):
    return ""
  if isinstance(args, tuple):
    args = args[0] if args else None
  return args if isinstance(args, str) else ""


def _to_rgb(img: Image.Image, rawmode: str, background: Sequence[int], path) -> np.ndarray:
  """uint8 [H, W, 3] RGB of a decoded image of any mode (see the module docstring)."""
  mode = img.mode
  if mode == "F":
    grey = _float_to_eight(np.asarray(img), path)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if mode.startswith("I;16") or mode == "I":
    grey = _sixteen_to_eight(np.asarray(img), mode, rawmode, path)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = np.asarray(img.convert("RGBA"))
    return _composite(rgba, background)
  return np.asarray(img.convert("RGB"))


def _sixteen_to_eight(arr: np.ndarray, mode: str, rawmode: str, path) -> np.ndarray:
  """uint8 [H, W] of 16-bit grayscale: round(v / 257).

  'I' (32-bit signed) holds 16-bit data when the file says so (rawmode 'I;16*', e.g.
  a 16-bit PNG read by an older PIL) or when every value lies in 0..65535 (16-bit
  data in a 32-bit container); other 'I' data has no known white level.

  Raises:
    DataError: naming ``path`` for 'I' pixels outside 0..65535.
  """
  arr = arr.astype(np.int64)
  if mode == "I" and not rawmode.startswith("I;16") and arr.size:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
      raise DataError(f"{path}: cannot decode image (32-bit integer pixels in {lo}..{hi} have "
                      "no known white level; save the photo as 8- or 16-bit)")
  return ((arr * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), halves up.


def _float_to_eight(arr: np.ndarray, path) -> np.ndarray:
  """uint8 [H, W] of float grayscale ('F'): the white level is 1, 255 or 65535, the smallest
  of them at or above the largest pixel (see the module docstring); below 0 is black.

  Raises:
    DataError: naming ``path`` for NaN or infinite pixels, or pixels above 65535.
  """
  arr = np.asarray(arr, np.float64)
  if not np.isfinite(arr).all():
    raise DataError(f"{path}: cannot decode image (float pixels include NaN or infinity; save "
                    "the photo as 8- or 16-bit)")
  top = float(arr.max()) if arr.size else 0.0
  white = next((w for w in (1.0, 255.0, 65535.0) if top <= w), None)
  if white is None:
    raise DataError(f"{path}: cannot decode image (float pixels up to {top:g} have no known "
                    "white level: expected [0, 1], [0, 255] or [0, 65535]; save the photo as 8- "
                    "or 16-bit)")
  return np.floor(np.clip(arr, 0.0, white) * (255.0 / white) + 0.5).astype(np.uint8)  # Halves up.


def _composite(rgba: np.ndarray, background: Sequence[int]) -> np.ndarray:
  """uint8 [H, W, 3]: uint8 RGBA [H, W, 4] over an opaque RGB background colour."""
  alpha = rgba[:, :, 3:].astype(np.uint32)
  bg = np.asarray(background, np.uint32).reshape(1, 1, 3)
  out = (rgba[:, :, :3].astype(np.uint32) * alpha + bg * (255 - alpha) + 127) // 255
  return out.astype(np.uint8)
