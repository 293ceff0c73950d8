"""c-SEMA (Liu & Larson 2021, section 4.3): the compositing semantic attack. No perturbation
budget: the attacker edits the item's photo, pasting the photo of a popular "hook" item
into it as an inset (AIP pastes it, resized, on the right side and adds a text such as
"match your jeans"; the text is left out here). The image depicts both items, so the item's
visual feature moves towards the hook's."""

from __future__ import annotations

import numpy as np
from PIL import Image


def composite_inset(images: np.ndarray, hook: np.ndarray, *, fraction: float = 0.45) -> np.ndarray:
  """The c-SEMA photos: each image with ``hook`` pasted on its right side.

  Args:
    images: uint8 [B, H, W, 3], the items' photos. hook: uint8 [H', W', 3].
    fraction: the inset's side as a fraction of the photo's side (0, 1].

  Returns:
    uint8 [B, H, W, 3]: the hook, resized (Lanczos) to ``fraction * H`` pixels square,
    vertically centred against the right edge; the rest of each photo unchanged.

  Raises:
    ValueError: ``fraction`` outside (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"c-SEMA inset fraction={fraction} must be in (0, 1]")
  out = np.array(images, copy=True)
  h, w = images.shape[1:3]
  side = max(1, int(round(fraction * min(h, w))))
  inset = np.asarray(Image.fromarray(np.asarray(hook, np.uint8)).resize(
      (side, side), Image.Resampling.LANCZOS))
  top = (h - side) // 2
  out[:, top:top + side, w - side:w] = inset
  return out
