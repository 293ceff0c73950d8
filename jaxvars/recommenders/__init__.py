"""Recommenders (VBPR, ...), chosen by ``config.recommender.name``; see :mod:`.base`."""

from jaxvars.recommenders.base import (FEATURES_FROM_IMAGES, FEATURES_FROM_TABLE, RECOMMENDERS,
                                       Recommender, RecommenderEntry, build_recommender)
from jaxvars.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["FEATURES_FROM_IMAGES", "FEATURES_FROM_TABLE", "RECOMMENDERS", "Recommender",
           "RecommenderEntry", "build_recommender"]
