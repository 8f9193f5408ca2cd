"""Several training sources drawn in given proportions, and the per-source counts that show it.

`MixtureStream` runs inside each DataLoader worker over that worker's share of every source (each
source is an `ImageTextStream`, split over ranks and workers as a single source is) and draws, per
sample, the source to take it from: seeded i.i.d. draws with the sources' weights, made in blocks
of `DRAW_BLOCK` from an RNG keyed by (seed, rank, worker, block). Its position is the number of
draws made plus each source's own position, so a resume continues with the very next draw.
Training sources are infinite, so a source that runs out starts its next epoch and the proportions
hold for any run length.

Why not HF's `interleave_datasets`: it mixes raw HF examples before our stream, so one source's
unreadable shard (skipped through the HF position of *that* source) and its block shuffle and epochs
could no longer be handled per source; its `all_exhausted` strategy stops when every source has run
out once (training streams must not end); and its position depends on every source's shard count
agreeing with the workers. Mixing decoded streams keeps each source exactly as it behaves alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from superclip_pl.data.sources import DataSource
from superclip_pl.data.stream import ImageTextStream

log = logging.getLogger(__name__)

DRAW_BLOCK = 4096  # draws made per RNG call


def source_names(sources: Sequence[DataSource], role: str = "train") -> tuple[list[str | None], list[float]]:
    """(names, normalised weights) of a list of sources, or one clear error.

    A single source keeps its name (None: unnamed, only the totals are logged); in a list an unnamed
    source is called `source<i>`.
    """
    if len(sources) == 1:
        return [sources[0].name], [1.0]
    names = [s.name if s.name is not None else f"source{i}" for i, s in enumerate(sources)]
    for i, s in enumerate(sources):
        if not isinstance(s.weight, int | float) or s.weight <= 0:
            raise ValueError(f"data.{role}[{i}].weight: {s.weight!r} must be > 0 ({s.describe()})")
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"data.{role}: the source name {twice[0]!r} is used twice; give every source its own name"
        )
    total = sum(s.weight for s in sources)
    return names, [s.weight / total for s in sources]


class MixtureStream(IterableDataset):
    """Samples drawn from `streams` with probabilities `weights`; each sample's `source` is its name.

    Args:
        streams: one infinite training stream per source (this rank's share of it).
        names: the sources' names (carried by the samples for `data/samples_read/<name>`).
        weights: probability of drawing each source, summing to 1.
        seed: seeds the draws (with rank, worker and block).
        rank: this process's rank, for the RNG.
    """

    def __init__(
        self, streams: list[ImageTextStream], names: list[str], weights: list[float], seed: int, rank: int
    ) -> None:
        self.streams, self.names, self.seed, self.rank = streams, names, seed, rank
        self.weights = np.asarray(weights, dtype=np.float64)
        self._start = self._position = 0  # draws made (the sources keep their own positions)

    @property
    def source_shards(self) -> list[int | None]:
        return [s.source_shards for s in self.streams]

    def state_dict(self) -> dict:
        return {
            "drawn": self._position,
            "names": self.names,
            "sources": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(
                f"a mixture state for sources {state['names']} cannot resume sources {self.names}"
            )
        self._start = self._position = state["drawn"]
        for stream, saved in zip(self.streams, state["sources"], strict=True):
            stream.load_state_dict(saved)

    def _draws(self, block: int, worker: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, worker, block, 0x6D6978])  # "mix"
        return rng.choice(len(self.names), size=DRAW_BLOCK, p=self.weights)

    def __iter__(self) -> Iterator[dict]:
        start, self._start = self._start, 0
        self._position = start
        info = get_worker_info()
        return self._samples(start, info.id if info is not None else 0)

    def _samples(self, drawn: int, worker: int) -> Iterator[dict]:
        sources = [iter(s) for s in self.streams]
        alive = [True] * len(sources)
        block, draws = None, None
        while any(alive):
            if drawn // DRAW_BLOCK != block:
                block = drawn // DRAW_BLOCK
                draws = self._draws(block, worker)
            k = int(draws[drawn % DRAW_BLOCK])
            drawn += 1
            if not alive[k]:  # a redraw: the weights renormalised over the sources this worker has
                self._position = drawn
                continue
            sample = next(sources[k], None)
            if sample is None:  # only when this worker holds none of the source's shards
                alive[k] = False
                log.warning(
                    "data: worker %d has no shard of source %r; it draws from the others",
                    worker,
                    self.names[k],
                )
                self._position = drawn
                continue
            self._position = drawn
            yield sample


class SourceCounts:
    """Samples read (usable + skipped) and caption fallbacks per source on this rank, from the
    batches' `counts`; `sync` sums them over ranks as `data/samples_read/<name>` and
    `data/caption_fallbacks[/<name>]` (unnamed sources count only in the total)."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.read = dict.fromkeys(self.names, 0)
        self.fallbacks = dict.fromkeys(self.names, 0)

    def add(self, counts: dict) -> None:
        for name, (read, fallbacks) in counts.items():
            self.read[name] = self.read.get(name, 0) + read
            self.fallbacks[name] = self.fallbacks.get(name, 0) + fallbacks

    def sync(self, strategy) -> dict[str, float]:
        names = self.names
        local = [self.read.get(n, 0) for n in names] + [self.fallbacks.get(n, 0) for n in names]
        total = strategy.reduce(torch.tensor(local, device=strategy.root_device), reduce_op="sum").tolist()
        read, fallbacks = total[: len(names)], total[len(names) :]
        metrics = {
            f"data/samples_read/{n}": float(r) for n, r in zip(names, read, strict=True) if n is not None
        }
        metrics |= {
            f"data/caption_fallbacks/{n}": float(f)
            for n, f in zip(names, fallbacks, strict=True)
            if n is not None
        }
        metrics["data/caption_fallbacks"] = float(sum(fallbacks))
        return metrics

    def state(self) -> dict:
        return {"names": self.names, "read": dict(self.read), "fallbacks": dict(self.fallbacks)}

    def load_state(self, state: dict) -> None:
        if state.get("names") == self.names:
            self.read, self.fallbacks = dict(state["read"]), dict(state["fallbacks"])
