"""Evaluation sets, read lazily and split across ranks.

Two sources:
- the CLIP_benchmark webdataset layout, as a local directory or an HF hub data set id (e.g.
  ``clip-benchmark/wds_vtab-cifar10``); hub files are fetched one shard at a time as iteration
  reaches them, so reading starts after the first shard and repeated (and offline) runs use the cache:

      <root>/classnames.txt                         one class name per line (classification)
      <root>/zeroshot_classification_templates.txt  one prompt per line, with {c} (optional)
      <root>/<split>/nshards.txt                    number of shards n (mandatory on the hub)
      <root>/<split>/0.tar .. <n-1>.tar             <key>.webp|png|jpg|jpeg + <key>.cls (an int)
                                                    or <key>.txt (captions, one per line)
- an HF data set with a ``ClassLabel`` column: ``hfsets.py``.

Ranks: ``rank`` reads a disjoint part and the parts of all ranks cover the set exactly once: whole
shards (shard i to rank i % world_size) when the shard count divides evenly, otherwise every rank
walks all shards and keeps every world_size-th sample. Each sample carries ``index``, the same on
every rank and for every world size (shard << 32 | position, or the row of an HF data set), for
de-duplication after gathering (``metrics.unique_rows``). ``max_samples`` keeps the first that many
samples in the set's global order whatever the world size (every rank walks the shards from the
start and stops there). Unreadable samples are skipped and counted (a warning after each pass); a
label outside the class list is an error: the class list and the shards disagree.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from PIL import Image

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # the ones CLIP_benchmark decodes, in its order
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class Record(NamedTuple):
    """One sample before decoding: image as bytes or a file path; target as stored (bytes, int)."""

    index: int
    key: str
    source: str  # shard or data set, for messages
    image: bytes | str | None
    target: Any


class Layout:
    """Files of a set in the CLIP_benchmark layout: a local directory or an HF hub data set repo."""

    def __init__(self, root: str):
        self.root = root
        self.local = Path(root).is_dir()
        if not self.local and (Path(root).exists() or not _HUB_ID.match(root)):
            raise FileNotFoundError(
                f"evaluation set root {root!r} is neither a directory nor a hub id "
                "(owner/name); check the path"
            )

    def where(self, name: str) -> str:
        return str(Path(self.root) / name) if self.local else f"hf://datasets/{self.root}/{name}"

    def fetch(self, name: str, required: bool = False) -> Path | None:
        """Local path of ``name`` (relative to the root); None when absent, unless ``required``."""
        if self.local:
            path = Path(self.root) / name
            if path.is_file():
                return path
            if required:
                raise FileNotFoundError(f"{self.where(name)} not found")
            return None
        try:
            return Path(hf_hub_download(self.root, name, repo_type="dataset"))
        except EntryNotFoundError as e:
            if required:
                raise FileNotFoundError(f"{self.where(name)} not found ({e})") from e
            if isinstance(e, LocalEntryNotFoundError):  # offline and not cached: we cannot tell
                log.warning(
                    "%s: not in the local cache and the hub is unreachable; treating it as absent",
                    self.where(name),
                )
            return None

    def shards(self, split: str) -> list[str]:
        """Shard names relative to the root, in order: from nshards.txt, else (locally) *.tar."""
        count = self.fetch(f"{split}/nshards.txt")
        if count is not None:
            names = [f"{split}/{i}.tar" for i in range(int(count.read_text().strip()))]
            if self.local:
                for name in names:
                    self.fetch(name, required=True)  # fail now, not half-way through an evaluation
        elif self.local:
            found = sorted(Path(self.root, split).glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
            names = [f"{split}/{p.name}" for p in found]
        else:
            names = []
        if not names:
            raise FileNotFoundError(
                f"no shards found at {self.where(split)}/ (expected 0.tar, 1.tar, ... "
                "and, on the hub, nshards.txt)"
            )
        return names

    def text_lines(self, name: str, required: bool) -> list[str] | None:
        path = self.fetch(name, required=required)
        return None if path is None else path.read_text(encoding="utf-8").splitlines()


def tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar shard. As in webdataset, consecutive members
    whose names agree up to the first dot of the file name form one sample; extensions lower-cased."""
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # stream mode: one pass, no index of members
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if members:
                    yield key, members
                key, members = k, {}
            members[ext.lower()] = tar.extractfile(member).read()
    if members:
        yield key, members


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def wds_records(
    layout: Layout, split: str, target_ext: str, rank: int, world_size: int, max_samples: int | None = None
) -> Callable[[], Iterator[Record]]:
    """A function that yields this rank's records of the split, reading shards lazily."""
    check_rank(rank, world_size)
    shards = layout.shards(split)

    def records() -> Iterator[Record]:
        # a cap needs each sample's global position, which only walking every shard in order gives
        by_shard = len(shards) % world_size == 0 and max_samples is None
        seen = 0  # samples walked so far, when every rank walks every shard
        for s in range(rank, len(shards), world_size) if by_shard else range(len(shards)):
            for pos, (key, members) in enumerate(tar_samples(layout.fetch(shards[s], required=True))):
                if not by_shard:
                    if max_samples is not None and seen >= max_samples:
                        return
                    seen += 1
                    if (seen - 1) % world_size != rank:
                        continue
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                yield Record((s << 32) | pos, key, layout.where(shards[s]), image, members.get(target_ext))

    return records


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
    """``classnames``; ``templates`` (None when the set ships none: use ``metrics.DEFAULT_TEMPLATES``);
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
