"""Input transformations applied before the recommender at inference."""

from jaxvars.defenses.transforms import random_resize_pad

__all__ = ["random_resize_pad"]
