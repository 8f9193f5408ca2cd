"""Evaluation sets in the CLIP_benchmark webdataset layout: where the files are (a local directory or
an HF hub data set repo), how shards are read, and which samples each rank reads.

    <root>/classnames.txt                           one class name per line (classification)
    <root>/zeroshot_classification_templates.txt    one prompt per line, with {c} (optional)
    <root>/<split>/nshards.txt                      number of shards n (mandatory on the hub)
    <root>/<split>/0.tar .. <n-1>.tar               <key>.webp|png|jpg|jpeg + <key>.cls (an int)
                                                    or <key>.txt (captions, one per line)
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

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
