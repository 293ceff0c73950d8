"""Recommenders (VBPR, BPR-MF, AMR, AlexRank), chosen by ``config.recommender.name``; see
:mod:`.base`."""

from jaxvars.recommenders.base import (BPR_STAGE, FEATURES_FROM_IMAGES, FEATURES_FROM_TABLE,
                                       RECOMMENDERS, LossTerms, Recommender, RecommenderEntry,
                                       TrainingStage, build_recommender, unread_fields)
from jaxvars.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["BPR_STAGE", "FEATURES_FROM_IMAGES", "FEATURES_FROM_TABLE", "RECOMMENDERS",
           "LossTerms", "Recommender", "RecommenderEntry", "TrainingStage", "build_recommender",
           "unread_fields"]
