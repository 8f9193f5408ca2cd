"""Evaluation: the callbacks, the distributed loop under them, the sets they read and the pure
metric functions, plus a view of what the vocabulary head predicts."""

from superclip_pl.eval.callbacks import ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.eval.head import HeadPredictions

__all__ = ["HeadPredictions", "ZeroShotClassification", "ZeroShotRetrieval"]
