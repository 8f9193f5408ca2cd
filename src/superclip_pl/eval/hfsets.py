"""Classification sets from any HF data set with a ``ClassLabel`` column (``load_dataset`` arguments),
streaming or not: the class names come from its features. Split over ranks like the CLIP_benchmark
sets of ``sets.py``, with the row number as each sample's index."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from superclip_pl.eval.sets import ClassificationSet, Record, check_rank


def load_hf_classification_set(
    path: str,
    split: str = "test",
    image_column: str | None = None,
    label_column: str = "label",
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    **load_dataset_kwargs: Any,
) -> ClassificationSet:
    """An HF data set (``load_dataset(path, split=split, **load_dataset_kwargs)``) whose
    ``label_column`` is a ``ClassLabel``; the image column defaults to the first ``Image`` feature."""
    import datasets

    check_rank(rank, world_size)
    name = f"{path} [{split}]"
    ds = datasets.load_dataset(path, split=split, **load_dataset_kwargs)
    features = ds.features or {}
    if not isinstance(features.get(label_column), datasets.ClassLabel):
        raise ValueError(
            f"{name}: column {label_column!r} is not a ClassLabel (features: "
            f"{dict(features) or 'unknown'}); pass label_column="
        )
    image_column = image_column or next(
        (c for c, f in features.items() if isinstance(f, datasets.Image)), None
    )
    if image_column not in features:
        raise ValueError(
            f"{name}: no image column {image_column!r} (columns: {list(features)}); pass image_column="
        )
    # decode ourselves, and only this rank's rows
    ds = ds.select_columns([image_column, label_column]).cast_column(
        image_column, datasets.Image(decode=False)
    )

    def records() -> Iterator[Record]:
        if isinstance(ds, datasets.Dataset):
            end = len(ds) if max_samples is None else min(len(ds), max_samples)
            indices = range(rank, end, world_size)
            rows = zip(indices, ds.select(indices), strict=True)
        else:  # streaming: every rank walks the stream and keeps every world_size-th row
            rows = ((i, row) for i, row in enumerate(islice(ds, max_samples)) if i % world_size == rank)
        for i, row in rows:
            image = row[image_column] or {}
            yield Record(i, str(i), name, image.get("bytes") or image.get("path"), row[label_column])

    classes_from = f"the ClassLabel column {label_column!r} of {name}"
    return ClassificationSet(name, list(features[label_column].names), None, records, classes_from)
