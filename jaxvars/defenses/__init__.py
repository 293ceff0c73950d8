"""Defences: the denoiser D, the contrastive detector, input transforms, and the registry
of defended systems (:mod:`jaxvars.defenses.systems`) built from them. Every module here is
imported, so a new defence registers itself by being a file of this package."""

from jaxvars.defenses.systems import SYSTEMS, UNDEFENDED, System, row_name
from jaxvars.defenses.transforms import random_resize_pad
from jaxvars.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["SYSTEMS", "UNDEFENDED", "System", "row_name", "random_resize_pad"]
