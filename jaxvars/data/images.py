"""Decoding product photos with PIL: pad to a square, resize, uint8 RGB."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxvars.errors import DataError


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """Reads one photo, pads it to a square with its border colour, resizes it.

  Args:
    path: a JPEG, PNG or any other format PIL decodes, of any size and aspect.
    size: output height and width in pixels.

  Returns:
    uint8 array [size, size, 3], RGB.

  Raises:
    DataError: naming ``path`` if it is missing or cannot be decoded.
  """
  try:
    with Image.open(path) as img:
      img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger.
      img = img.convert("RGB")
      arr = np.asarray(img)
  except FileNotFoundError:
    raise DataError(f"{path}: image file is missing") from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"{path}: cannot decode image ({e})") from None
  h, w = arr.shape[:2]
  if h != w:
    side = max(h, w)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    colour = np.median(border, axis=0).astype(np.uint8)
    square = np.empty((side, side, 3), np.uint8)
    square[...] = colour
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = arr
    arr = square
  if arr.shape[0] != size:
    arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
  return np.ascontiguousarray(arr, dtype=np.uint8)
