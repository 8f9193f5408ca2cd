"""Webdataset tar shards as a streaming HF `IterableDataset` whose samples may carry different fields.

HF's `webdataset` builder infers one schema from the first 5 samples of the first shard and refuses
shards whose samples differ in their fields (merged scrapes mix .jpg, .png and .webp samples); given
`features` it skips that check but still encodes every example against them, one Python call per
field and sample. Here HF still resolves the files (`load_dataset_builder`: local globs, hub
repositories, remote URLs, tokens) and opens them (`xopen`: local, hf://, https://), but tar members
are grouped into samples by us with webdataset's rule (consecutive members that share a key
prefix), and only the fields asked for are kept, as raw bytes. Wrapped in
`IterableDataset.from_generator` with the tar files as its shards, the result splits over ranks
(`split_dataset_by_node`) and DataLoader workers and saves its position (`state_dict`) like any HF
source, without per-example feature encoding.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from itertools import islice

import datasets
import fsspec
from datasets.download import DownloadConfig
from datasets.utils.file_utils import xopen

log = logging.getLogger(__name__)

# re-reads of a failing remote shard, and the first wait in seconds (doubled each time)
RETRIES, BACKOFF = 3, 1.0

# webdataset's split of a member name into sample key and field: the key is everything up to the
# first dot of the file name ("dir/000017.seg.jpg" -> "dir/000017", "seg.jpg")
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _open(url: str, config: DownloadConfig | None):
    """The file at `url` for one streamed read. Plain http(s) URLs (not the hub's) are opened by fsspec
    as a stream (block_size=0), without the read retries HF's `xopen` adds: those call `read` again on
    a stream that has broken (20 x 5 s before failing), where `tar_samples` retries by reopening it.
    Everything else (local, hf://, s3://, gs://) goes through `xopen` (the hub's tokens, HF's storage
    options per protocol)."""
    http = url.startswith(("http://", "https://"))
    if http and "huggingface.co" not in url:
        options = dict(config.storage_options) if config is not None else {}
        protocol = url.split("://")[0]
        flat = {k: v for k, v in options.items() if k not in fsspec.available_protocols()}
        return fsspec.open(url, "rb", block_size=0, **options.get(protocol, flat)).open()
    return xopen(url, "rb", download_config=config, **({"block_size": 0} if http else {}))


def _members(url: str, config: DownloadConfig | None) -> Iterator[tuple[str, tarfile.ExFileObject]]:
    """(name, file) of the regular, non-hidden members of the tar at `url`, streamed.

    Read as a stream (remote files need not be seekable). tarfile's stream reader joins and slices
    its whole buffer on every read, 512-byte headers included, so a read costs in proportion to the
    buffer: on the benchmark's 120 KB samples 1 MiB cost 0.39 ms per sample, 32 KiB 0.08 ms (about
    tarfile's default 10 KiB, or seekable random access; `benchmarks/data_pipeline.py`; docs/benchmarks.md).
    """
    with _open(url, config) as f, tarfile.open(fileobj=f, mode="r|*", bufsize=1 << 15) as stream:
        for info in stream:
            if info.isreg() and not os.path.basename(info.name).startswith((".", "__")):
                yield info.name, stream.extractfile(info)
            stream.members = []  # streaming: keep no index of the members read


def tar_samples(
    urls: list[str], fields: tuple[str, ...] | None = None, download_config: DownloadConfig | None = None
) -> Iterator[dict]:
    """Samples `{"__key__", "__url__", field: bytes, ...}` of the tar files `urls`, in order.

    `fields`: keep only these (compared without case; None keeps all). A remote shard whose read fails
    (a connection reset mid-shard) is read again up to RETRIES times, BACKOFF x 1, 2, 4 ... seconds
    apart, continuing with the sample after the last one handed out (the stream is the undisturbed
    one). A member that cannot be read after that, or at all in a local file (a truncated tar), raises
    from here, and the caller moves on to the next shard (counted as `truncated_shard`).
    """
    wanted = None if fields is None else {f.lower() for f in fields}
    for url in urls:
        done, attempt = 0, 0  # samples of this shard handed out; reads of it that failed
        while True:
            try:
                for i, sample in enumerate(_shard_samples(url, wanted, download_config)):
                    if i >= done:  # after a retry: the samples handed out before are read again, not kept
                        done += 1
                        yield sample
                break
            except Exception as err:
                remote = "://" in url and not url.startswith("file://")
                if not remote or attempt >= RETRIES:
                    raise  # a truncated local file, or a remote one that keeps failing: the shard is skipped
                attempt += 1
                log.warning(
                    "reading %s failed after %d samples (%s: %s); retry %d of %d in %.1f s",
                    url, done, type(err).__name__, err, attempt, RETRIES, BACKOFF * 2 ** (attempt - 1),
                )  # fmt: skip
                time.sleep(BACKOFF * 2 ** (attempt - 1))


def _shard_samples(url: str, wanted: set[str] | None, config: DownloadConfig | None) -> Iterator[dict]:
    sample: dict | None = None
    for name, member in _members(url, config):
        match = _KEY_AND_FIELD.match(name)
        if match is None:
            continue
        key, field = match.groups()
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        if wanted is None or field.lower() in wanted:
            sample[field] = member.read()
    if sample is not None:
        yield sample


def first_samples(urls: list[str], config: DownloadConfig | None, n: int = 100) -> list[dict]:
    """Up to `n` samples with all their fields from the first shards that can be read (at most 4):
    they tell which columns a source has. An unreadable shard is left to the stream to count."""
    first: list[dict] = []
    for url in urls[:4]:
        try:
            first += islice(tar_samples([url], None, config), n - len(first))
        except Exception:  # tar and network errors alike: look at the next shard
            continue
        if len(first) >= n:
            break
    return first


def tar_dataset(
    urls: list[str], fields: list[str] | None, config: DownloadConfig | None
) -> datasets.IterableDataset:
    """The streaming data set over the tar files `urls` (its shards), keeping `fields` (and key, url)."""
    return datasets.IterableDataset.from_generator(
        # a tuple: HF shards over the one list in gen_kwargs
        tar_samples,
        gen_kwargs={
            "urls": urls,
            "fields": None if fields is None else tuple(fields),
            "download_config": config,
        },
    )
