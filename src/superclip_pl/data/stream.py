"""A resumable stream of decoded image-caption samples from one rank's share of a streaming data set.

Layers, inside each DataLoader worker:
1. `ShardReader`: the HF `IterableDataset` (already split by rank with `split_dataset_by_node`;
   HF splits its shards over the workers itself) for one epoch, read raw (images undecoded), and
   carried past a shard that stops being readable (a truncated tar) to the next shard.
2. Block shuffle: `shuffle_buffer` raw examples are read, permuted with a seeded RNG and handed
   out. Unlike `IterableDataset.shuffle`, whose buffer content is lost on resume, the position is
   exact and small: the HF state where the block started plus how many of it were handed out. A
   resume re-reads at most one block of raw bytes (no decoding) and continues with the very next
   sample. The shard order changes every epoch (HF reshuffles shards from the epoch number).
3. Decoding, with skipped samples counted per reason and attached to the next good sample. Every
   random draw of a sample (caption, crop) comes from the block's seeded RNG, none from a global one.

Training streams are infinite: a worker starts its next epoch when its shards run out, so the
trainer's `max_steps` decides the length and no rank ever runs out of batches before another.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from itertools import islice

import datasets
import numpy as np
import torch
from torch.utils.data import get_worker_info

from superclip_pl.data.decode import SampleDecoder

log = logging.getLogger(__name__)

FRESH = {"epoch": 0, "block": 0, "start": None, "emitted": 0}


def next_shard_state(state: dict) -> dict:
    """The HF `state_dict` moved to the start of the shard after the one being read.

    HF keeps the position of its (single-source) examples iterables as `shard_idx` /
    `shard_example_idx`, possibly wrapped (rank striding, arrow re-batching); every copy of that
    position is moved past the shard that failed.
    """
    state = copy.deepcopy(state)
    nodes, positions = [state], []
    while nodes:
        node = nodes.pop()
        if "shard_idx" in node:
            positions.append(node)
        if "num_chunks_since_previous_state" in node:  # arrow re-batching: restart at a clean chunk
            node["num_chunks_since_previous_state"] = node["cropped_chunk_length"] = 0
        nodes += [v for v in node.values() if isinstance(v, dict)]
    if not positions:
        raise RuntimeError(f"cannot skip an unreadable shard: no shard position in the stream state {state}")
    next_shard = max(p["shard_idx"] for p in positions) + 1
    for p in positions:
        p["shard_idx"], p["shard_example_idx"] = next_shard, 0
    return state


class ShardReader:
    """Raw examples of one epoch of `hf` for this worker, from the position `start`.

    An exception while reading (a truncated or otherwise unreadable shard) yields the marker
    "truncated_shard" and resumes at the next shard instead of ending the stream. HF's position
    inside arrow-backed sources can lag by one shard after a restart, so a failure before any
    example right after a skip is taken for the same bad spot: a run of consecutive unreadable
    shards counts once, the same way whether or not the run was resumed in between.
    """

    def __init__(self, hf: datasets.IterableDataset, epoch: int, start: dict | None) -> None:
        # A fresh IterableDataset per epoch: `set_epoch` writes to a counter in shared memory
        # (meant to be set from the main process), and our workers change epochs independently.
        self.ds = hf.with_format(None)
        self.ds.set_epoch(epoch)
        start = start or {"hf": None, "after_failure": False}
        self._restart, self._after_failure, self._reading = start["hf"], start["after_failure"], False

    def position(self) -> dict:
        """Where the reader is: HF state after the last example read (None: start of the epoch)."""
        hf = self.ds.state_dict() if self._reading else copy.deepcopy(self._restart)
        return {"hf": hf, "after_failure": self._after_failure}

    def __iter__(self) -> Iterator[dict | str]:
        while True:
            if self._restart is not None:
                self.ds.load_state_dict(self._restart)
            try:
                for example in self.ds:
                    self._reading = True
                    self._after_failure = False
                    yield example
                return
            except Exception as err:  # tar/parquet/network errors all mean: this shard is done
                counted = not self._after_failure
                self._restart, self._reading = next_shard_state(self.ds.state_dict()), False
                self._after_failure = True
                log.warning(
                    "unreadable shard skipped (%s: %s); continuing with the next", type(err).__name__, err
                )
                if counted:
                    yield "truncated_shard"


class ImageTextStream(torch.utils.data.IterableDataset):
    """Decoded samples `{"key", "pixel_values", "text", "skipped"}` from a rank's share of `hf`.

    `state_dict()` is the position after the last sample handed out, exact with DataLoader workers
    (StatefulDataLoader keeps one such state per worker).

    Args:
        hf: raw (undecoded) streaming data set, already split for this rank.
        decoder: raw example -> sample, or the reason it is skipped.
        shuffle_buffer: samples per shuffled block; 0 or 1 keep the stream order.
        seed: seeds the block permutations and caption choices (with epoch, rank and worker).
        infinite: start the next epoch when the shards run out (training) instead of stopping.
        rank: this process's rank, for the RNG.
        source_shards: shards in the whole source, all ranks together (for messages).
        source_index: the source's place in a mixture, for the RNG (sources shuffle independently).
    """

    def __init__(
        self,
        hf: datasets.IterableDataset,
        decoder: SampleDecoder,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        infinite: bool = False,
        rank: int = 0,
        source_shards: int | None = None,
        source_index: int = 0,
    ) -> None:
        self.hf, self.decoder, self.source_shards = hf, decoder, source_shards
        # a single source (index 0) keeps the RNG key it always had
        self.rng_key = (rank,) if source_index == 0 else (rank, source_index)
        self.block_size, self.shuffle = max(1, shuffle_buffer), shuffle_buffer > 1
        self.seed, self.infinite, self.rank = seed, infinite, rank
        self._start = dict(FRESH)  # where the next iteration starts (set by load_state_dict)
        self._position = dict(FRESH)  # where the current iteration is

    def state_dict(self) -> dict:
        # positions are never changed once made (each step builds a new dict, and HF's own
        # `state_dict` is a copy), so the StatefulDataLoader can keep them without a deep copy
        return self._position

    def load_state_dict(self, state: dict) -> None:
        self._start, self._position = copy.deepcopy(state), copy.deepcopy(state)

    def _raw(self, epoch: int, start: dict, worker: int) -> Iterator[tuple[dict | str, list]]:
        """(raw example or skip marker, [caption column and caption uniforms, crop seed]) for the rest
        of `epoch` from `start`,
        updating `self._position` before each item is handed out."""
        reader = ShardReader(self.hf, epoch, start["start"])
        examples = iter(reader)
        block, emitted = start["block"], start["emitted"]
        while True:
            block_start = reader.position()
            items = list(islice(examples, self.block_size))
            if not items:
                return
            block_end = reader.position()
            rng = np.random.default_rng([self.seed, epoch, block, *self.rng_key, worker])
            order = rng.permutation(len(items)) if self.shuffle else np.arange(len(items))
            choices = rng.random((len(items), 2))  # per example: caption column, caption in it
            # per example: the seed of its random crop, drawn here rather than from a worker's global RNG
            # (reseeded from the main process at every DataLoader iterator), so that a resumed stream
            # crops each sample exactly as the uninterrupted one did
            crops = rng.integers(0, 2**63 - 1, size=len(items))
            for j in range(emitted, len(items)):
                if j + 1 < len(items):
                    self._position = {"epoch": epoch, "block": block, "start": block_start, "emitted": j + 1}
                else:
                    self._position = {"epoch": epoch, "block": block + 1, "start": block_end, "emitted": 0}
                yield items[order[j]], [*choices[order[j]].tolist(), int(crops[order[j]])]
            block, emitted = block + 1, 0

    def _decoded(self, start: dict, worker: int) -> Iterator[dict | str]:
        """Samples and skip reasons from `start`, epoch after epoch when infinite."""
        while True:
            whole_pass = start == {**FRESH, "epoch": start["epoch"]}  # not resumed inside the epoch
            usable, skipped = 0, Counter()
            for raw, choice in self._raw(start["epoch"], start, worker):
                out = raw if isinstance(raw, str) else self.decoder(raw, choice)
                if isinstance(out, str):
                    skipped[out] += 1
                else:
                    usable += 1
                yield out
            if not self.infinite or (whole_pass and not usable and not skipped):
                return  # one pass asked for, or this worker has no shard at all
            if whole_pass and not usable:
                raise RuntimeError(
                    f"data: a whole pass over a worker's shards gave no usable sample (skipped: "
                    f"{dict(skipped)}); check the data and the image/text columns"
                )
            start = {**FRESH, "epoch": start["epoch"] + 1}

    def __iter__(self) -> Iterator[dict]:
        # A loaded state is used once; a later iteration (the next validation pass) starts afresh.
        # Set eagerly: a DataLoader worker asks for the state before it asks for the first sample.
        start, self._start = self._start, dict(FRESH)
        self._position = copy.deepcopy(start)
        info = get_worker_info()
        return self._samples(start, info.id if info is not None else 0)

    def _samples(self, start: dict, worker: int) -> Iterator[dict]:
        pending: Counter[str] = Counter()
        held = None  # finite streams hold one sample back so that trailing skips still get counted
        for out in self._decoded(start, worker):
            if isinstance(out, str):
                pending[out] += 1
                continue
            if self.infinite:
                out["skipped"], pending = dict(pending), Counter()
                yield out
                continue
            if held is not None:
                held["skipped"], pending = dict(pending), Counter()
                yield held
            held = out
        if held is not None:
            held["skipped"] = dict(pending)
            yield held
