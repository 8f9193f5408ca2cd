"""superclip-pl: SuperCLIP (CLIP + a vocabulary classifier on the image tower) with PyTorch Lightning.

The names below are imported on first use, so that `superclip --help` and `superclip export` start
without importing Lightning and transformers.
"""

from importlib import import_module

_WHERE = {
    "EMA": "superclip_pl.train.ema",
    "EmbeddingWriter": "superclip_pl.eval.embeddings",
    "HeadPredictions": "superclip_pl.eval",
    "ImageTextDataModule": "superclip_pl.data",
    "DataSource": "superclip_pl.data",
    "LinearProbe": "superclip_pl.eval",
    "LitSuperCLIP": "superclip_pl.train.module",
    "SuperCLIP": "superclip_pl.model",
    "batch_size": "superclip_pl.train.module",
    "ZeroShotClassification": "superclip_pl.eval",
    "ZeroShotRetrieval": "superclip_pl.eval",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'superclip_pl' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
