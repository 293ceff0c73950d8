"""A deterministic synthetic fashion catalogue whose purchases follow visual taste.

Each item is a garment silhouette (``SHAPES``) in one colour (``COLOURS``) with
one pattern (``PATTERNS``), drawn with PIL on a light background with small
random jitter. Each user has Dirichlet-distributed tastes over shapes, colours
and patterns; their purchases are drawn without replacement with probability
proportional to ``taste(shape) * taste(colour) * taste(pattern)**0.5 *
popularity(item)``. The visual content of a photo therefore predicts who buys
it, which is what VBPR's visual term can exploit and a popularity ranking
cannot.

Everything is a pure function of its arguments (explicit seeds; no global state).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from jaxvars.errors import ConfigError

MIN_ITEMS = 5 + 101  # Every user buys >= 5 items and leaves >= 101 untouched (100 negatives).
SHAPES = ("tshirt", "trousers", "dress", "skirt", "bag", "shoe")
COLOURS = {
    "black": (25, 25, 28), "white": (250, 250, 246), "red": (200, 30, 40),
    "navy": (25, 40, 100), "green": (40, 130, 60), "yellow": (240, 200, 40),
    "pink": (240, 150, 190), "beige": (210, 190, 150), "grey": (130, 130, 135),
    "orange": (240, 120, 30),
}
PATTERNS = ("solid", "hstripes", "vstripes", "dots", "checks")

_POLYGONS = {
    "tshirt": [(0.3, 0.15), (0.42, 0.12), (0.5, 0.18), (0.58, 0.12), (0.7, 0.15), (0.9, 0.35),
               (0.8, 0.45), (0.72, 0.38), (0.72, 0.88), (0.28, 0.88), (0.28, 0.38), (0.2, 0.45),
               (0.1, 0.35)],
    "trousers": [(0.3, 0.1), (0.7, 0.1), (0.76, 0.9), (0.57, 0.9), (0.5, 0.38), (0.43, 0.9),
                 (0.24, 0.9)],
    "dress": [(0.4, 0.1), (0.6, 0.1), (0.62, 0.35), (0.82, 0.9), (0.18, 0.9), (0.38, 0.35)],
    "skirt": [(0.36, 0.25), (0.64, 0.25), (0.82, 0.8), (0.18, 0.8)],
    "bag": [(0.22, 0.42), (0.78, 0.42), (0.78, 0.85), (0.22, 0.85)],
    "shoe": [(0.12, 0.5), (0.42, 0.5), (0.52, 0.62), (0.86, 0.68), (0.9, 0.82), (0.12, 0.82)],
}


@dataclasses.dataclass(frozen=True)
class SyntheticCatalogue:
  """Items and interactions of the synthetic dataset.

  Attributes:
    item_ids: [I] str, ``"item00042"``.
    shape, colour, pattern: [I] int indices into SHAPES, COLOURS, PATTERNS.
    user_ids: [U] str.
    interactions: list of (user_id, item_ids [n] str, timestamps [n] int64 days).
  """
  item_ids: np.ndarray
  shape: np.ndarray
  colour: np.ndarray
  pattern: np.ndarray
  user_ids: np.ndarray
  interactions: list


def generate_catalogue(*, num_users: int, num_items: int, mean_interactions: float,
                       seed: int) -> SyntheticCatalogue:
  """Draws item attributes and user purchases (see module docstring).

  Raises:
    ConfigError: naming ``config.data.synthetic.*`` if ``num_items`` is too small for users
      to have at least 5 purchases and 101 untouched items (:data:`MIN_ITEMS`), or
      ``num_users`` is not a positive integer.
  """
  if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or (
      num_items < MIN_ITEMS):
    raise ConfigError(f"config.data.synthetic.num_items={num_items!r} must be an integer >= "
                      f"{MIN_ITEMS} (every user buys at least 5 items and leaves at least 101 "
                      "untouched, for the evaluation negatives)")
  if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)) or num_users < 1:
    raise ConfigError(f"config.data.synthetic.num_users={num_users!r} must be an integer >= 1")
  rng = np.random.default_rng(seed)
  shape = rng.integers(0, len(SHAPES), num_items)
  colour = rng.integers(0, len(COLOURS), num_items)
  pattern = rng.integers(0, len(PATTERNS), num_items)
  popularity = rng.lognormal(0.0, 0.6, num_items)
  item_ids = np.array([f"item{k:05d}" for k in range(num_items)])
  user_ids = np.array([f"user{k:05d}" for k in range(num_users)])
  interactions = []
  max_n = max(5, num_items - 101)
  for u in range(num_users):
    t_shape = rng.dirichlet(np.full(len(SHAPES), 0.4))
    t_colour = rng.dirichlet(np.full(len(COLOURS), 0.3))
    t_pattern = rng.dirichlet(np.full(len(PATTERNS), 0.8))
    p = t_shape[shape] * t_colour[colour] * np.sqrt(t_pattern[pattern]) * popularity + 1e-9
    n = int(min(max_n, 5 + rng.poisson(max(mean_interactions - 5, 0))))
    chosen = rng.choice(num_items, size=n, replace=False, p=p / p.sum())
    days = np.sort(rng.integers(0, 730, n)).astype(np.int64)
    interactions.append((user_ids[u], item_ids[chosen], days))
  return SyntheticCatalogue(item_ids, shape, colour, pattern, user_ids, interactions)


def render_item(*, shape: int, colour: int, pattern: int, size: int, seed: int) -> np.ndarray:
  """Draws one product photo.

  Args:
    shape, colour, pattern: indices into SHAPES, COLOURS, PATTERNS.
    size: output height and width in pixels.
    seed: seed of the jitter (position, scale, colour shade, background).

  Returns:
    uint8 array [size, size, 3].
  """
  rng = np.random.default_rng(seed)
  big = size * 2  # Draw at twice the size, then downsample: anti-aliased edges.
  base = np.array(list(COLOURS.values())[colour], np.float64)
  fill = tuple(int(v) for v in np.clip(base + rng.normal(0, 10, 3), 0, 255))
  second = tuple(int(v) for v in (np.clip(base * 0.45, 0, 255) if base.mean() > 128
                                  else np.clip(base + (255 - base) * 0.7, 0, 255)))
  bg = tuple(int(v) for v in np.clip(236 + rng.normal(0, 6, 3), 200, 255))

  texture = Image.new("RGB", (big, big), fill)
  draw = ImageDraw.Draw(texture)
  period = max(4, big // int(rng.integers(6, 10)))
  name = PATTERNS[pattern]
  if name == "hstripes":
    for y in range(0, big, period):
      draw.rectangle([0, y, big, y + period // 2], fill=second)
  elif name == "vstripes":
    for x in range(0, big, period):
      draw.rectangle([x, 0, x + period // 2, big], fill=second)
  elif name == "dots":
    r = max(1, period // 4)
    for y in range(period // 2, big, period):
      for x in range(period // 2, big, period):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=second)
  elif name == "checks":
    for y in range(0, big, period):
      for x in range(0, big, period):
        if ((x // period) + (y // period)) % 2:
          draw.rectangle([x, y, x + period, y + period], fill=second)

  scale = rng.uniform(0.85, 1.0)
  dx, dy = rng.uniform(-0.05, 0.05, 2)
  pts = [((x - 0.5) * scale + 0.5 + dx, (y - 0.5) * scale + 0.5 + dy) for x, y in _POLYGONS[SHAPES[shape]]]
  mask = Image.new("L", (big, big), 0)
  mdraw = ImageDraw.Draw(mask)
  mdraw.polygon([(x * big, y * big) for x, y in pts], fill=255)
  if SHAPES[shape] == "bag":  # A handle.
    cx, top = (0.5 + dx) * big, (0.42 * scale + 0.5 * (1 - scale) + dy) * big
    w = 0.18 * scale * big
    mdraw.arc([cx - w, top - w, cx + w, top + w], 180, 360, fill=255, width=max(2, big // 28))
  canvas = Image.new("RGB", (big, big), bg)
  canvas.paste(texture, (0, 0), mask)
  outline = ImageDraw.Draw(canvas)
  outline.polygon([(x * big, y * big) for x, y in pts], outline=tuple(int(v * 0.6) for v in fill))
  return np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
