"""A StatefulDataLoader whose saved position is the one the model has trained up to, per rank.

Two things stand between `StatefulDataLoader.state_dict()` and an exact resume under Lightning:
- Lightning's fetcher pre-fetches one batch ahead of the training step (it needs to know when an
  iterable without length ends), so at checkpoint time the loader has produced one batch more than
  the model consumed, and its plain state would skip that batch on resume. With
  `track_consumed`, the loader snapshots its state after each batch it produces and reports the
  snapshot of the last batch the data module saw go into a training step (`mark_consumed`).
- Lightning writes the checkpoint from rank 0 only, and its fit loop restores that rank's loader
  state into every rank. Each state therefore says which rank it belongs to; the data module
  gathers all ranks' states into the checkpoint and gives each rank its own, and a state that
  belongs to another rank is ignored here.
"""

from __future__ import annotations

import copy
import logging
import signal
import warnings
from collections import deque
from collections.abc import Iterator
from functools import partial

from torchdata.stateful_dataloader import StatefulDataLoader

log = logging.getLogger(__name__)


def _worker_init(user_init, worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGINT: schedulers signal every process of a job (and Ctrl-C the
    terminal's whole process group), and a worker ended by it would fail the main process before it
    saves its checkpoint (``superclip_pl.train.signals``); the main process ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)


class StreamLoader(StatefulDataLoader):
    """StatefulDataLoader with a rank-tagged state that can follow consumption instead of production.

    Args:
        rank, world_size: the process this loader feeds, recorded in (and checked against) its state.
        track_consumed: report the state after the last batch passed to `mark_consumed` (Lightning)
            instead of after the last batch produced (plain iteration).
        **kwargs: StatefulDataLoader arguments.
    """

    def __init__(
        self, *args, rank: int = 0, world_size: int = 1, track_consumed: bool = False, **kwargs
    ) -> None:
        kwargs["worker_init_fn"] = partial(_worker_init, kwargs.get("worker_init_fn"))
        with warnings.catch_warnings():  # torchdata 0.11 calls an API that torch 2.13 deprecates: noise
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(*args, **kwargs)
        self.rank, self.world_size, self.track_consumed = rank, world_size, track_consumed
        self._produced: deque[dict] = deque()  # loader states after batches produced, not yet consumed
        self._consumed: dict = {}  # loader state after the last consumed batch ({} = from the start)

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        if not self.track_consumed:
            return iterator
        self._produced.clear()
        return self._tracking(iterator)

    def _tracking(self, iterator) -> Iterator:
        for batch in iterator:
            # no copy: StatefulDataLoader builds a new snapshot dict per state (from the workers'
            # unpickled states, or from the stream's `state_dict`, whose positions are never
            # changed once made), so this reference stays what it was when the batch was produced
            self._produced.append(super().state_dict())
            yield batch

    def mark_consumed(self) -> None:
        """The oldest batch produced and not yet consumed has now gone into a training step."""
        if self._produced:
            self._consumed = self._produced.popleft()

    def state_dict(self) -> dict:
        position = self._consumed if self.track_consumed else super().state_dict()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "loader": copy.deepcopy(position),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        mine = {"rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers}
        theirs = {k: state_dict.get(k) for k in mine}
        if theirs != mine:
            # rank 0's state offered to another rank (Lightning's fit loop), or a changed setup
            log.debug("ignoring a loader state saved for %s (this loader: %s)", theirs, mine)
            return
        self._consumed = copy.deepcopy(state_dict["loader"])
        super().load_state_dict(state_dict["loader"])


def resume_mismatch(saved: list[dict], world_size: int, num_workers: int, sources: list) -> str | None:
    """Why the per-rank stream positions of a checkpoint (`saved`) cannot be resumed by this run, or
    None when they can: the ranks, the workers per rank and the training sources must be the same."""
    workers = saved[0]["loader"]["num_workers"]
    if len(saved) != world_size or any(s["loader"]["num_workers"] != num_workers for s in saved):
        return f"for {len(saved)} ranks x {workers} workers, this run has {world_size} x {num_workers}"
    names = saved[0].get("sources", {}).get("names", [None])
    if names != sources:
        return f"for the sources {names}, this run reads {sources}"
    return None
