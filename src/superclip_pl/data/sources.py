"""Where image-caption pairs come from: `load_dataset(..., streaming=True)` arguments plus column names.

Anything `load_dataset` streams works: hub ids ("pixparse/cc3m-wds"), local webdataset tar shards
("webdataset" + data_files), parquet files ("parquet"), CSV / TSV files of image paths and captions
("csv", open_clip's format), image folders with a metadata.jsonl/csv ("imagefolder"), or a local
directory. Problems with a source are reported here, before training starts, in one line that names
the bad value and the choices.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any

import datasets
from braceexpand import braceexpand
from datasets.download import DownloadConfig

from superclip_pl.data import csvfiles, tars


@dataclass
class DataSource:
    """One split of an image-caption data set: `load_dataset` arguments, column names, and (in a
    mixture of training sources) its name and weight.

    Args:
        path: `load_dataset` path: a hub id ("pixparse/cc3m-wds"), a builder ("webdataset", "parquet",
            "csv", "imagefolder") used with `data_files`, or a local directory.
        data_files: files or glob patterns, e.g. "data/shapes/train/*.tar" or "s3://bucket/shards/*.tar";
            a dict maps splits to them. Brace ranges and lists ("shard-{00000..41455}.tar") and `::`
            between several patterns are expanded as open_clip and webdataset expand them. A CSV's
            relative image paths are read relative to the CSV file's directory.
        split: split to read.
        name: the source's name in logs (`data/samples_read/<name>`) and messages.
        weight: share of the training samples drawn from this source when `data.train` lists several
            (weights are normalised to sum 1).
        config_name: configuration name of a hub data set (`load_dataset`'s `name`).
        data_dir: sub-directory of `path` to read.
        revision: git revision (branch, tag or commit) of a hub data set.
        image_column: column holding the image, or a list of candidates (a sample's image is the
            first of them it has: webdataset shards that mix .jpg, .png, .webp samples); found
            among jpg, jpeg, png, webp, image, img, filepath, file_name if unset.
        text_column: column holding the caption (a text, a list of texts, or JSON with a caption), or
            several columns with the probability of drawing each per sample, e.g. {txt: 0.5,
            recaption: 0.5} (an empty drawn column falls back to a non-empty one, and is counted);
            found among txt, caption, text, captions, title if unset.
        separator: the column separator of CSV files, one character (or tab, comma); unset: a tab
            for .tsv / .tab files, else a comma (open_clip's --csv-separator defaults to a tab).
        storage_options: fsspec options of remote `data_files` (s3://, gs://, https://), e.g.
            {endpoint_url: http://minio:9000, anon: true} or {profile: research}; passed to HF's file
            resolution and to the tar reader (`pip install "superclip-pl[s3]"` / `[gcs]` for the protocols).
    """

    path: str
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    name: str | None = None
    weight: float = 1.0
    config_name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    image_column: str | list[str] | None = None
    text_column: str | dict[str, float] | None = None
    separator: str | None = None
    storage_options: dict[str, Any] | None = None

    def describe(self) -> str:
        """`path=..., data_files=..., split=...`: the fields that are set, for messages."""
        return ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) is not None and (f.name != "weight" or self.weight != 1.0)
        )


@dataclass
class OpenedSource:
    """A source opened for streaming: its first examples (they tell its columns), the data set
    restricted to the columns a stream reads (`select(columns, parts)`: `Columns`, and how many
    readers, ranks x workers, will share it), and a check of the first examples' images (`check`)."""

    first: list[dict]
    schema_less: bool  # webdataset tars: samples may differ in their fields
    num_shards: int
    select: Callable[..., datasets.IterableDataset]
    check: Callable[[tuple[str, ...]], None] = lambda images: None


def expand_data_files(files):
    """`data_files` with brace patterns and `::` lists expanded (a str becomes a list when it expands
    to several); dicts (split -> files) are expanded per split."""
    if isinstance(files, dict):
        return {split: expand_data_files(v) for split, v in files.items()}
    if files is None:
        return None
    patterns = [files] if isinstance(files, str) else list(files)
    out = [f for p in patterns for part in str(p).split("::") for f in braceexpand(part)]
    return out[0] if isinstance(files, str) and len(out) == 1 else out


def _explicit_remote_shards(source: DataSource) -> list[str] | None:
    """The tar URLs of a webdataset source that lists remote shards by name (no glob): read as given,
    without asking the store about each of them (open_clip's shard lists name tens of thousands)."""
    files = expand_data_files(source.data_files)
    files = [files] if isinstance(files, str) else files
    if source.path != "webdataset" or not isinstance(files, list) or not files:
        return None
    if any("://" not in f or any(c in f for c in "*?[") for f in files):
        return None
    return files


def missing_local_patterns(source: DataSource) -> list[str]:
    """Local `data_files` patterns that match no file (hub and remote patterns are not checked)."""
    if "/" in source.path and not os.path.exists(source.path):
        return []  # a hub id: its data_files are relative to the repository
    base = source.path if os.path.isdir(source.path) else ""
    if source.data_dir:
        base = os.path.join(base, source.data_dir)
    patterns = expand_data_files(source.data_files)
    if isinstance(patterns, dict):
        patterns = [p for v in patterns.values() for p in ([v] if isinstance(v, str) else v)]
    elif isinstance(patterns, str):
        patterns = [patterns]
    return [
        p for p in patterns or [] if "://" not in p and not glob.glob(os.path.join(base, p), recursive=True)
    ]


def open_source(source: DataSource, role: str = "train") -> OpenedSource:
    """Open `source` for streaming, with media decoding off (we decode ourselves, so that a corrupt
    image is a counted skip instead of an exception inside the HF iterator). Webdataset tars are
    read by `tars.py` (samples may differ in their fields), everything else by HF's builders."""
    if missing := missing_local_patterns(source):
        raise ValueError(f"data.{role}.data_files: {missing[0]!r} matches no file ({source.describe()})")
    try:
        if (urls := _explicit_remote_shards(source)) is not None:
            config = DownloadConfig(storage_options=dict(source.storage_options or {}))
            first = tars.first_samples(urls, config)
            return OpenedSource(
                first, True, len(urls), lambda columns, parts=1: tars.tar_dataset(urls, columns.all, config)
            )
        builder = datasets.load_dataset_builder(
            source.path,
            name=source.config_name,
            data_dir=source.data_dir,
            data_files=expand_data_files(source.data_files),
            revision=source.revision,
            storage_options=source.storage_options,
        )
        config = DownloadConfig(token=builder.token, storage_options=builder.storage_options)
        if (urls := _builder_files(builder, "webdataset", source.split)) is not None:
            first = tars.first_samples(urls, config)
            return OpenedSource(
                first, True, len(urls), lambda columns, parts=1: tars.tar_dataset(urls, columns.all, config)
            )
        if (urls := _builder_files(builder, "csv", source.split)) is not None:
            return _opened_csv(urls, source, role, config)
        if source.separator is not None:
            raise ValueError(f"data.{role}.separator: applies to CSV / TSV files only ({source.describe()})")
        ds = builder.as_streaming_dataset(split=source.split)
        ds = ds if ds.features is None else ds.decode(False)  # unknown features (json): nothing decodes
        examples = iter(ds)
        first = list(islice(examples, 1))
        examples.close()
    except Exception as err:  # load_dataset raises many types; all mean "cannot open this source"
        if isinstance(err, ValueError) and str(err).startswith(f"data.{role}."):
            raise  # ours (a CSV's separator): already one line naming the key
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"data.{role}: cannot open {source.describe()}: {reason}") from err
    return OpenedSource(first, False, ds.num_shards, lambda columns, parts=1: ds.select_columns(columns.all))


def _builder_files(builder: datasets.DatasetBuilder, name: str, split: str) -> list[str] | None:
    """The files of `split` when `builder` is HF's `name` builder (webdataset, csv): we read those
    ourselves; else None."""
    if builder.name != name or not builder.config.data_files:
        return None
    if split not in builder.config.data_files:
        raise ValueError(f"no split {split!r}; splits found: {sorted(builder.config.data_files)}")
    return list(builder.config.data_files[split])


def _opened_csv(urls: list[str], source: DataSource, role: str, config: DownloadConfig) -> OpenedSource:
    """CSV / TSV files, read by `csvfiles.py`: rows dealt out over the `parts` readers of a stream."""
    first = csvfiles.first_rows(urls, source.separator, role, config)

    def select(columns, parts: int = 1) -> datasets.IterableDataset:
        return csvfiles.csv_dataset(urls, columns.all, columns.images, parts, source.separator, config, role)

    return OpenedSource(
        first, False, len(urls), select, lambda images: csvfiles.check_first_images(urls, first, images, role)
    )


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
