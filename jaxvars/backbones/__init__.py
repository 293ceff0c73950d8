"""Image backbones (feature extractors) behind one interface, chosen by ``config.backbone.arch``.

Every backbone is a ``flax.linen.Module`` called as ``module.apply(variables, x, train=False)``
with ``x`` float32 [B, H, W, 3] in [0, 1] (pixel space: preprocessing happens inside the
model, so attacks perturb pixels) and returns a dict of float32 arrays:

* ``'pooled'``: [B, F], the global average of ``'stage4'`` (the item feature f_i of VBPR);
* ``'stage2'``, ``'stage3'``, ``'stage4'``: feature maps at strides 8, 16 and 32 (the
  perceptual loss's maps);
* ``'logits'``: [B, 1000] ImageNet logits, only for backbones with a classifier head.

and has the property ``feature_dim`` (F).
"""
