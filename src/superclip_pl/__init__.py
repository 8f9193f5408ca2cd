"""superclip-pl: SuperCLIP (CLIP + a vocabulary classifier on the image tower) with PyTorch Lightning."""

from superclip_pl.data import ImageTextDataModule
from superclip_pl.eval import HeadPredictions, LinearProbe, ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.model import SuperCLIP
from superclip_pl.module import LitSuperCLIP

__all__ = [
    "HeadPredictions",
    "ImageTextDataModule",
    "LinearProbe",
    "LitSuperCLIP",
    "SuperCLIP",
    "ZeroShotClassification",
    "ZeroShotRetrieval",
]
