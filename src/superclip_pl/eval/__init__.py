"""Evaluation: the callbacks, the distributed loop under them, the sets they read, the pure metric
and linear-probe functions, the results table, plus a view of what the vocabulary head predicts."""

from superclip_pl.eval.callbacks import ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.eval.head import HeadPredictions
from superclip_pl.eval.linear_probe import LinearProbe

__all__ = ["HeadPredictions", "LinearProbe", "ZeroShotClassification", "ZeroShotRetrieval"]
