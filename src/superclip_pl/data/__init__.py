"""The data pipeline: sources (`load_dataset` arguments), decoding, the resumable stream, the
stateful loader, and the data module that puts them together."""

from superclip_pl.data.datamodule import ImageTextDataModule
from superclip_pl.data.sources import DataSource

__all__ = ["DataSource", "ImageTextDataModule"]
