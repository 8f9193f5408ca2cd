"""Where image-caption pairs come from: `load_dataset(..., streaming=True)` arguments plus column names.

Anything `load_dataset` streams works: hub ids ("pixparse/cc3m-wds"), local webdataset tar shards
("webdataset" + data_files), parquet files ("parquet"), image folders with a metadata.jsonl/csv
("imagefolder"), or a local directory. Problems with a source are reported here, before training
starts, in one line that names the bad value and the choices.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, fields

import datasets

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
TEXT_COLUMNS = ("txt", "caption", "text", "captions")
# columns that name a sample (webdataset's __key__ / __url__, or an id column): kept for `keys`
KEY_COLUMNS = ("__key__", "__url__", "key", "id")


@dataclass
class DataSource:
    """One split of an image-caption data set: `load_dataset` arguments plus column names.

    Args:
        path: `load_dataset` path: a hub id ("pixparse/cc3m-wds"), a builder ("webdataset", "parquet",
            "imagefolder") used with `data_files`, or a local directory.
        data_files: files or glob patterns, e.g. "data/shapes/train/*.tar"; a dict maps splits to them.
        split: split to read.
        name: configuration name of a hub data set.
        data_dir: sub-directory of `path` to read.
        revision: git revision (branch, tag or commit) of a hub data set.
        image_column: column holding the image; found among jpg, jpeg, png, webp, image, img if unset.
        text_column: column holding the caption (a text, a list of texts, or JSON with a caption);
            found among txt, caption, text, captions if unset.
    """

    path: str
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    image_column: str | None = None
    text_column: str | None = None

    def describe(self) -> str:
        """`path=..., data_files=..., split=...`: the fields that are set, for messages."""
        return ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) is not None
        )


@dataclass(frozen=True)
class Columns:
    """The columns a stream reads: image, caption, and whatever names a sample."""

    image: str
    text: str
    keys: tuple[str, ...] = ()

    @property
    def all(self) -> list[str]:
        return [self.image, self.text, *self.keys]


def _missing_local_patterns(source: DataSource) -> list[str]:
    """Local `data_files` patterns that match no file (hub and remote patterns are not checked)."""
    if "/" in source.path and not os.path.exists(source.path):
        return []  # a hub id: its data_files are relative to the repository
    base = source.path if os.path.isdir(source.path) else ""
    if source.data_dir:
        base = os.path.join(base, source.data_dir)
    patterns = source.data_files
    if isinstance(patterns, dict):
        patterns = [p for v in patterns.values() for p in ([v] if isinstance(v, str) else v)]
    elif isinstance(patterns, str):
        patterns = [patterns]
    return [
        p for p in patterns or [] if "://" not in p and not glob.glob(os.path.join(base, p), recursive=True)
    ]


def open_source(source: DataSource, role: str = "train") -> datasets.IterableDataset:
    """Open `source` as a streaming `IterableDataset` with media decoding off (we decode ourselves,
    so that a corrupt image is a counted skip instead of an exception inside the HF iterator)."""
    if missing := _missing_local_patterns(source):
        raise ValueError(f"data.{role}.data_files: {missing[0]!r} matches no file ({source.describe()})")
    try:
        ds = datasets.load_dataset(
            source.path,
            name=source.name,
            data_dir=source.data_dir,
            data_files=source.data_files,
            split=source.split,
            revision=source.revision,
            streaming=True,
        )
    except Exception as err:  # load_dataset raises many types; all mean "cannot open this source"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"data.{role}: cannot open {source.describe()}: {reason}") from err
    return ds.decode(False)


def _find(columns: list[str], wanted: str) -> str | None:
    """`wanted` among `columns`, exactly or else ignoring case."""
    if wanted in columns:
        return wanted
    return next((c for c in columns if c.lower() == wanted.lower()), None)


def resolve_columns(columns: list[str], source: DataSource, role: str = "train") -> Columns:
    """Pick the image, caption and key columns among `columns`, or fail naming what exists."""

    def pick(kind: str, given: str | None, candidates: tuple[str, ...]) -> str:
        if given is not None:
            if (found := _find(columns, given)) is None:
                raise ValueError(
                    f"data.{role}.{kind}_column: {given!r} is not a column of {source.describe()}; "
                    f"columns found: {columns}"
                )
            return found
        for candidate in candidates:
            if (found := _find(columns, candidate)) is not None:
                return found
        raise ValueError(
            f"data.{role}: no {kind} column in {source.describe()} (looked for {', '.join(candidates)}); "
            f"set data.{role}.{kind}_column to one of the columns found: {columns}"
        )

    image = pick("image", source.image_column, IMAGE_COLUMNS)
    text = pick("text", source.text_column, TEXT_COLUMNS)
    keys = tuple(c for c in KEY_COLUMNS if c in columns and c not in (image, text))
    return Columns(image=image, text=text, keys=keys)


def sharding_advice(num_shards: int, world_size: int, num_workers: int) -> str | None:
    """A warning when `num_shards` does not split evenly over ranks x workers, else None.

    Shards are the unit of parallelism: `split_dataset_by_node` gives each rank whole shards when
    their number divides the world size (otherwise every rank reads every shard and keeps 1 sample
    in `world_size`), and each rank's DataLoader workers then share that rank's shards.
    """
    workers = max(num_workers, 1)
    problems, per_rank = [], num_shards // world_size
    if num_shards % world_size:
        problems.append(f"every rank reads all {num_shards} shards and keeps 1 sample in {world_size}")
        per_rank = num_shards
    if per_rank < workers:
        problems.append("some workers will idle")
    elif per_rank % workers:
        problems.append("workers get unequal shares and finish unevenly")
    if not problems:
        return None
    fix = f"use a multiple of {world_size * workers} shards"
    fitting = max(w for w in range(1, workers + 1) if per_rank % w == 0)
    if fitting != workers:
        fix += f" or set num_workers={fitting}"
    return f"{num_shards} shards over {world_size} ranks x {workers} workers: {'; '.join(problems)}; {fix}"
