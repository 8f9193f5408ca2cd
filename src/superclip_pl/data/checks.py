"""Checks of the data module's arguments that need no data read and no model built: the CLI runs
them on the parsed config before anything is instantiated, the data module on its own arguments
(the Python API). Each failure is one line naming the key, the value and what to do."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from superclip_pl.errors import UserError

# key: (smallest allowed value, what it means when it is too small)
MINIMUM = {
    "batch_size": (1, "samples per device and step"),
    "global_batch_size": (1, "samples per optimizer step over all devices"),
    "num_workers": (0, "DataLoader worker processes (0: load in the main process)"),
    "image_size": (1, "the image side in pixels"),
    "max_length": (2, "caption tokens, BOS and EOS included"),
    "shuffle_buffer": (0, "samples shuffled together (0: stream order)"),
    "max_image_pixels": (1, "pixels of the largest image read"),
    "class_max_length": (1, "caption tokens the classification targets come from"),
}
# data.jpeg_decoder: auto = OpenCV when installed (the `opencv` extra), else PIL
JPEG_DECODERS = ("auto", "pil", "opencv")


def check_numbers(values: Mapping) -> None:
    """Sizes and fractions of `values` (the data module's arguments; None: not set)."""
    for key, (least, what) in MINIMUM.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"data.{key}={value!r}: must be an integer >= {least} ({what})")
    decoder = values.get("jpeg_decoder", "auto")
    if decoder not in JPEG_DECODERS:
        raise UserError(
            f"data.jpeg_decoder={decoder!r}: choose one of {', '.join(JPEG_DECODERS)} "
            "(how training decodes JPEGs)"
        )
    if decoder == "opencv":
        from superclip_pl.data import jpeg

        if not jpeg.available():
            raise UserError(
                "data.jpeg_decoder='opencv': OpenCV is not installed; pip install 'superclip-pl[opencv]', "
                "or use auto (OpenCV when installed, else PIL) or pil"
            )
    fraction = values.get("max_skip_fraction")
    if fraction is not None and not 0 <= fraction <= 1:
        raise UserError(
            f"data.max_skip_fraction={fraction!r}: must be between 0 and 1 (the share of bad samples "
            "a run tolerates; 1 never stops)"
        )


def as_source(role: str, value):
    """A `DataSource` from a source or a plain dict of its fields (the Python API); None stays None."""
    from superclip_pl.data.sources import DataSource

    if value is None or isinstance(value, DataSource):
        return value
    if not isinstance(value, Mapping):
        raise UserError(f"data.{role}={value!r}: give a source, e.g. {{path: webdataset, data_files: ...}}")
    known = [f.name for f in fields(DataSource)]
    if unknown := sorted(set(value) - set(known)):
        raise UserError(f"data.{role}.{unknown[0]}: not a source field; the fields are {', '.join(known)}")
    if "path" not in value:
        raise UserError(f"data.{role}.path is required (a hub id, webdataset, parquet, imagefolder or a dir)")
    return DataSource(**value)


def check_sources(values: Mapping, roles=("train", "val", "test")) -> None:
    """Local `data_files` patterns that match no file, for the sources of `roles` in `values`."""
    from superclip_pl.data.sources import missing_local_patterns

    for role in roles:
        sources = values.get(role)
        for i, source in enumerate(sources if isinstance(sources, list) else [sources]):
            if source is None:
                continue
            key = f"{role}[{i}]" if isinstance(sources, list) else role
            source = as_source(key, source)
            if missing := missing_local_patterns(source):
                raise UserError(
                    f"data.{key}.data_files={missing[0]!r} matches no file; check the path "
                    "(relative to the current directory) or run `make data` for the demo data"
                )
            check_columns(source, key)


# builders that read local files: a source with one of them (or a local directory) is opened here
LOCAL_BUILDERS = ("webdataset", "parquet", "imagefolder", "arrow", "json", "csv")


def check_columns(source, key: str) -> None:
    """The image and caption columns of a local source, from its first examples: a wrong column is
    then one line before the model and the trainer are built (hub sources are checked when opened)."""
    from superclip_pl.data.columns import columns_found, resolve_columns
    from superclip_pl.data.sources import open_source

    files = source.data_files
    files = list(files.values()) if isinstance(files, dict) else [files]
    if not (source.path in LOCAL_BUILDERS or os.path.isdir(source.path)) or "://" in str(files):
        return
    try:
        opened = open_source(source, key)
        if not opened.first:
            raise ValueError(f"data.{key}: {source.describe()} has no example")
        columns = resolve_columns(columns_found(opened.first), source, key, schema_less=opened.schema_less)
        opened.check(columns.images)
    except ValueError as err:
        raise UserError(str(err).strip().splitlines()[0]) from None


def check_tokenizer(name: str | None) -> None:
    """A local tokenizer directory that does not exist (a hub id has at most one `/`)."""
    if name is None or Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(
            f"data.tokenizer={name!r}: no such directory; give a tokenizer directory (data/shapes/tokenizer "
            "is made by `make data`) or a hub id such as openai/clip-vit-base-patch16"
        )
