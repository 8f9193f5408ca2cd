"""The data pipeline: sources (`load_dataset` arguments), decoding, the resumable stream, the
stateful loader, and the data module that puts them together. Imported on first use (the data
module needs Lightning, the sources `datasets`)."""

from importlib import import_module

_WHERE = {"DataSource": "superclip_pl.data.sources", "ImageTextDataModule": "superclip_pl.data.datamodule"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'superclip_pl.data' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
