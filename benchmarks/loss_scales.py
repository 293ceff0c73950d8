"""How the denoiser's content and perceptual losses weigh image changes (issue 11's
fidelity question): for a few known changes of real photos, the content term (pixel MSE,
the PSNR it means) against the perceptual term on the backbone's stage maps.

  python benchmarks/loss_scales.py --images='../shared/data/hm/images/*/*.jpg' \\
      --arch=efficientnet_lite0 --init=pretrained:imagenet --size=96 --out=/tmp/loss_scales.json

Each photo is read as the data pipeline reads it (padded to a square with its border
colour, resized to ``--size``; ``jaxvars.data.images.load_image``); the first ``--count``
of the sorted file list are used. Changes: +-eps/255 sign noise (an FGSM-sized
perturbation, seeded), a colour cast (the channels scaled by 1.00 / 0.95 / 0.85, beige
towards yellow), a brightness shift (+0.05) and a Gaussian blur (PIL, radius 1 px). For
each: the content term ``mean((x' - x)^2)`` (what ``jaxvars.losses.content`` computes per
input), its PSNR, and the perceptual term ``sum_s mean((phi_s(x') - phi_s(x))^2)``
(``jaxvars.losses.perceptual``) with each stage's share, and ``E[phi_s(x)^2]`` of the
clean maps. The ratio perceptual / content says how much content weight it takes before a
change that the perceptual term barely sees (a colour cast) costs as much as it saves
elsewhere. Prints a table, writes JSON. Not a timing.
"""

import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxvars import losses, provenance  # noqa: E402
from jaxvars.backbones import PERCEPTUAL_MAPS, load_backbone  # noqa: E402
from jaxvars.data.images import load_image  # noqa: E402

_IMAGES = flags.DEFINE_string("images", "../shared/data/hm/images/*/*.jpg",
                              "Glob of photos (sorted; the first --count are used).")
_COUNT = flags.DEFINE_integer("count", 64, "Photos measured.")
_SIZE = flags.DEFINE_integer("size", 96, "Image side (px).")
_ARCH = flags.DEFINE_string("arch", "efficientnet_lite0", "A registered backbone.")
_INIT = flags.DEFINE_string("init", "pretrained:imagenet", "config.backbone.init.")
_EPS = flags.DEFINE_float("eps", 8.0, "Sign-noise amplitude (1/255).")
_OUT = flags.DEFINE_string("out", "loss_scales.json", "JSON output path.")


def _changes(x: np.ndarray, eps: float, seed: int = 0) -> dict:
  """{name: changed images}, float32 [N, H, W, 3] in [0, 1]."""
  rng = np.random.default_rng(seed)
  blur = np.stack([np.asarray(Image.fromarray(np.round(im * 255).astype(np.uint8)).filter(
      ImageFilter.GaussianBlur(1)), np.float32) / 255 for im in x])
  return {
      f"sign noise +-{eps:g}/255": np.clip(x + rng.choice([-eps, eps], size=x.shape) / 255, 0, 1),
      "colour cast (x1.00, x0.95, x0.85)": np.clip(x * np.float32([1.0, 0.95, 0.85]), 0, 1),
      "brightness +0.05": np.clip(x + 0.05, 0, 1),
      "Gaussian blur, 1 px": blur,
  }


def main(argv):
  del argv
  files = sorted(glob.glob(_IMAGES.value))[:_COUNT.value]
  if not files:
    raise SystemExit(f"--images={_IMAGES.value!r} matches no file")
  x = np.stack([load_image(f, _SIZE.value) for f in files]).astype(np.float32) / 255
  cfg = ml_collections.ConfigDict({"arch": _ARCH.value, "init": _INIT.value, "width": 64,
                                   "small_stem": False, "feature_norm": "none"})
  module, variables = load_backbone(cfg, image_size=_SIZE.value, key=jax.random.key(0))
  forward = jax.jit(lambda im: module.apply(variables, im, train=False))
  clean = forward(x)
  energy = {s: float(jnp.mean(jnp.square(clean[s]))) for s in PERCEPTUAL_MAPS}
  rows = {}
  for name, changed in _changes(x, _EPS.value).items():
    out = forward(changed)
    content = float(losses.content(clean=x, denoised=changed))
    stages = {s: float(losses.perceptual(clean_maps=clean, denoised_maps=out, stages=(s,)))
              for s in PERCEPTUAL_MAPS}
    perceptual = sum(stages.values())
    rows[name] = {"content": content, "psnr_db": float(10 * np.log10(1.0 / content)),
                  "perceptual": perceptual, "perceptual_by_stage": stages,
                  "perceptual_over_content": perceptual / content}
  header = ["change", "content (MSE)", "PSNR dB", "perceptual", *PERCEPTUAL_MAPS,
            "perceptual / content"]
  print(f"{_ARCH.value} ({_INIT.value}), {_SIZE.value} px, {len(files)} photos; "
        "E[phi_s^2] of the clean maps: " + ", ".join(f"{s} {v:.2f}" for s, v in energy.items()))
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for name, r in rows.items():
    print(f"| {name} | {r['content']:.5f} | {r['psnr_db']:.1f} | {r['perceptual']:.2f} | "
          + " | ".join(f"{r['perceptual_by_stage'][s]:.2f}" for s in PERCEPTUAL_MAPS)
          + f" | {r['perceptual_over_content']:,.0f} |")
  with open(_OUT.value, "w") as f:
    json.dump({"arch": _ARCH.value, "init": _INIT.value, "size": _SIZE.value,
               "photos": len(files), "clean_energy": energy, "changes": rows,
               "provenance": provenance.describe()}, f, indent=2)
  print(f"written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
