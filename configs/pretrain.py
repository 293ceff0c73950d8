"""Self-supervised pretraining of the ResNet on the catalogue's own photos (SimCLR).

  python -m jaxvars.main --config=configs/pretrain.py:cpu,hm --workdir=/tmp/pretrain_hm

Takes the same presets as configs/joint.py (the data, backbone and VBPR fields are the
same) and adds ``config.pretrain``. The result is exported to ``<workdir>/backbone`` and
used by configs/joint.py with ``--config.backbone.init=self_supervised:<workdir>``.
After pretraining, the run measures what the backbone buys: a linear probe on the item
categories and VBPR's HR@10 / NDCG@10, for the random and the pretrained backbone
(``results.json``, section ``backbone``).
"""

import importlib.util
import os

import ml_collections


def _joint():
  spec = importlib.util.spec_from_file_location(
      "jaxvars_configs_joint", os.path.join(os.path.dirname(os.path.abspath(__file__)), "joint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The joint config of the same presets, with task='pretrain' and a pretrain section."""
  c = _joint().get_config(arg)
  size, dataset = c.presets.split(",")[:2]
  c.task = "pretrain"
  c.pretrain = p = ml_collections.ConfigDict()
  p.epochs = 100  # Passes over the catalogue's images.
  p.batch_size = 256  # Images per step (2 views each), split over the mesh.
  p.lr = 1e-3  # Peak AdamW learning rate (warmup, then cosine decay to 0).
  p.weight_decay = 1e-4  # AdamW weight decay.
  p.warmup_epochs = 5  # Linear warmup.
  p.temperature = 0.2  # NT-Xent temperature.
  p.min_area = 0.2  # Smallest random-resized-crop area.
  p.jitter = 0.4  # Colour-jitter strength (brightness, contrast, saturation).
  p.jitter_prob = 0.8  # Probability of the colour jitter.
  p.head_hidden = 512  # Projection head: hidden width.
  p.head_dim = 128  # Projection head: output dimension.
  p.max_minutes = 0.0  # Stop pretraining after this many minutes (0 = no limit); resumable.
  p.compare_vbpr = True  # Also train VBPR on each backbone and report HR@10 / NDCG@10.
  p.probe = pr = ml_collections.ConfigDict()
  pr.min_per_class = 5  # Categories with fewer labelled items are left out of the probe.
  pr.test_fraction = 0.2  # Held-out share of the labelled items.
  pr.steps = 500  # Full-batch Adam steps of the softmax-regression probe.
  if size == "cpu":
    p.epochs = 8
    p.batch_size = 128
    p.warmup_epochs = 1
    p.head_hidden = 256
    if dataset == "hm":  # 16,581 photos: few epochs, and a time limit, on 2 CPU cores.
      p.epochs = 6
      p.max_minutes = 45.0
  elif size == "tiny":
    p.epochs = 2
    p.batch_size = 32
    p.warmup_epochs = 1
    p.head_hidden = 16
    p.head_dim = 8
    p.compare_vbpr = False
    pr.steps = 50
  return c
