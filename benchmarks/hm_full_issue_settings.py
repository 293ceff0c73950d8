"""``cpu,hm,full`` at the settings it had when the CPU-speed issue took its baseline time.

The CPU-speed issue's target: "the H&M ``cpu,hm,full`` run at least 3x faster than today
at the same settings". "Today" was commit 3802b06, whose README gives the time of
``cpu,hm,full`` from scratch on 2 CPU cores. Its settings differ from today's preset
(EfficientNet-Lite0 with ImageNet weights, five systems, four rand draws, the adaptive and
targeted sections, four ablations); this config rebuilds the old ones on top of the
current preset, field by field (a diff of the two configs' flattened fields):

* backbone: ResNet-18, width 32, random init, feature batch 256, 32 px;
* defence trained on eps drawn from {4, 8, 16, 32, 64} (then the preset's default);
* systems: VBPR, OURS, OURS-rand with border padding and one draw (then the only ones);
* ablations: ``no_detector`` and ``no_perceptual`` (``multi_eps`` and ``trained_encoder``
  came later);
* no adaptive and no targeted attacks (later issues).

What the current code adds at any settings stays on: the out-of-sample split (the defence
trains on 70% of the items, the same number of steps), bootstrap intervals, the
Gaussian-noise and fidelity checks, the report's extra tables.

Usage (results/performance.md gives the measured times)::

  python -m jaxvars.main --config=benchmarks/hm_full_issue_settings.py --workdir=DIR
"""

import ml_collections

from configs import joint


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The ``cpu,hm,full`` config with the fields of commit 3802b06 (``arg`` is ignored)."""
  del arg
  c = joint.get_config("cpu,hm,full")
  c.presets += ",issue15_settings"
  c.backbone.arch = "resnet18"
  c.backbone.width = 32
  c.backbone.init = "random"
  c.backbone.feature_batch_size = 256
  c.defense.train_eps_choices = (4.0, 8.0, 16.0, 32.0, 64.0)
  c.denoiser.rand_pad = "border"
  c.systems.evaluate = ("undefended", "defended", "defended_rand")
  c.eval.rand_draws = 1
  c.attack.adaptive.eps = ()
  c.targeted.num_targets = 0
  c.ablation.variants = ml_collections.ConfigDict({
      "no_detector": ("loss.contrastive=0", "stages.detector.epochs=0"),
      "no_perceptual": ("loss.perceptual=0",)})
  return c
