"""Evaluation sets, read lazily and split across ranks.

Two sources:
- the CLIP_benchmark webdataset layout (``benchmark_layout.py``), as a local directory or an HF hub
  data set id (e.g. ``clip-benchmark/wds_vtab-cifar10``). Hub files are fetched one shard at a time
  as iteration reaches them, so reading starts after the first shard and repeated evaluations (and
  offline runs) use the cache.
- an HF data set with a ``ClassLabel`` column (``load_hf_classification_set``): class names from
  its features, any ``load_dataset`` arguments, streaming or not.

Ranks: ``rank`` reads a disjoint part and the parts of all ranks cover the set exactly once: whole
shards (shard i to rank i % world_size) when the shard count divides evenly, otherwise every rank
walks all shards and keeps every world_size-th sample. Each sample carries ``index``, an id that is
the same on every rank and for every world size (shard number << 32 | position in the shard, or the
row number of an HF data set), for de-duplication after gathering (``zeroshot.unique_rows``).
``max_samples`` keeps the first that many samples of the set in its global order, whatever the world
size (every rank then walks the shards from the start and stops there, so a quick evaluation reads
only the first shards).
Unreadable samples are skipped and counted (a warning at the end of each pass); a label outside the
class list is an error, because it means the class list and the shards disagree.
"""

from __future__ import annotations

import io
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, NamedTuple

from PIL import Image

from superclip_pl.benchmark_layout import IMAGE_EXTENSIONS, Layout, Record, check_rank, wds_records

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


class ClassificationSample(NamedTuple):
    index: int  # same id on every rank, for de-duplication after gathering
    key: str
    image: Image.Image  # RGB
    label: int


class RetrievalSample(NamedTuple):
    index: int
    key: str
    image: Image.Image  # RGB
    captions: list[str]


class _BadSample(Exception):
    """A sample that cannot be read: skipped and counted, not fatal."""


def _open_image(data: bytes | str | None) -> Image.Image:
    if data is None:
        raise _BadSample(f"no image (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise _BadSample(f"undecodable image ({e})") from e


class _EvalSet(ABC):
    """Iterating reads this rank's samples afresh; ``skipped`` counts bad ones of the last pass."""

    def __init__(self, name: str, records: Callable[[], Iterator[Record]]):
        self.name = name
        self._records = records
        self.skipped = 0

    @abstractmethod
    def _decode(self, rec: Record) -> Any:
        """The sample of a record; raises ``_BadSample`` for an unreadable one."""

    def __iter__(self) -> Iterator[Any]:
        self.skipped, first = 0, ""
        for rec in self._records():
            try:
                sample = self._decode(rec)
            except _BadSample as e:
                self.skipped += 1
                first = first or f"{rec.source} sample {rec.key!r}: {e}"
                continue
            yield sample
        if self.skipped:
            log.warning(
                "%s: skipped %d unreadable samples on this rank (first: %s)", self.name, self.skipped, first
            )


class ClassificationSet(_EvalSet):
    """``classnames``; ``templates`` (None when the set ships none: use ``zeroshot.DEFAULT_TEMPLATES``);
    iterating yields this rank's :class:`ClassificationSample` s."""

    def __init__(
        self,
        name: str,
        classnames: list[str],
        templates: list[str] | None,
        records: Callable[[], Iterator[Record]],
        classes_from: str,
    ):
        super().__init__(name, records)
        self.classnames, self.templates, self._classes_from = classnames, templates, classes_from

    def _decode(self, rec: Record) -> ClassificationSample:
        try:
            label = int(rec.target)  # int() parses the bytes of a .cls member, e.g. b"3\n"
        except (TypeError, ValueError) as e:
            raise _BadSample(f"no integer label (got {rec.target!r:.40})") from e
        if not 0 <= label < len(self.classnames):
            raise ValueError(
                f"{rec.source} sample {rec.key!r}: label {label} is outside the "
                f"{len(self.classnames)} classes of {self._classes_from}"
            )
        return ClassificationSample(rec.index, rec.key, _open_image(rec.image), label)


class RetrievalSet(_EvalSet):
    """Iterating yields this rank's :class:`RetrievalSample` s (an image and its non-empty captions)."""

    def _decode(self, rec: Record) -> RetrievalSample:
        text = rec.target.decode("utf-8") if isinstance(rec.target, bytes) else rec.target
        captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not captions:
            raise _BadSample("no captions")
        return RetrievalSample(rec.index, rec.key, _open_image(rec.image), captions)


def load_classification_set(
    root: str, split: str = "test", rank: int = 0, world_size: int = 1, max_samples: int | None = None
) -> ClassificationSet:
    """A classification set in the CLIP_benchmark layout at ``root`` (directory or hub id)."""
    layout = Layout(root)
    classnames = [line.strip() for line in layout.text_lines(CLASSNAMES_FILE, required=True)]
    if not classnames:
        raise ValueError(f"{layout.where(CLASSNAMES_FILE)} is empty; it must list one class name per line")
    lines = layout.text_lines(TEMPLATES_FILE, required=False)
    templates = None if lines is None else [t.strip() for t in lines if t.strip()]
    for t in templates or []:
        if "{c}" not in t:
            raise ValueError(
                f"{layout.where(TEMPLATES_FILE)}: template {t!r} has no {{c}} for the class name"
            )
    records = wds_records(layout, split, "cls", rank, world_size, max_samples)
    return ClassificationSet(root, classnames, templates or None, records, layout.where(CLASSNAMES_FILE))


def load_retrieval_set(
    root: str, split: str = "test", rank: int = 0, world_size: int = 1, max_samples: int | None = None
) -> RetrievalSet:
    """An image-caption retrieval set in the CLIP_benchmark layout at ``root`` (directory or hub id)."""
    return RetrievalSet(root, wds_records(Layout(root), split, "txt", rank, world_size, max_samples))


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
