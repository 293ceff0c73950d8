"""flax.linen models: ResNet feature extractor and VBPR."""
