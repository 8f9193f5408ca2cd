"""``RngState``: every rank's global random number generators, saved with each checkpoint and restored
when a fit resumes from it.

A resumed run re-seeds its RNGs (``seed_everything``) and then continues from the checkpoint's
weights, optimizer and data position; whatever draws from the global RNGs during training (dropout,
patch dropout, a user's callback) would then draw the numbers of step 0 again instead of those of
the step reached. Lightning saves no RNG state (its fault-tolerant training, which did, was removed
in 2.0). Here each rank's Python, NumPy, torch CPU and CUDA generator states
(``lightning.fabric.utilities.seed._collect_rng_states``) are gathered into the checkpoint, which
rank 0 alone writes, and each rank gets its own back when training starts. The data pipeline's
random draws (shuffle, caption choice, crops) come from its own seeded RNGs and resume with the
stream position, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningModule, Trainer


def _every_rank(obj, world_size: int) -> list:
    """``obj`` of every rank, in rank order (all ranks call it together)."""
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _plain(states: dict) -> dict:
    """The states as tensors, ints and floats only: a checkpoint stays readable with
    ``torch.load(weights_only=True)`` (NumPy's state holds an array)."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _numpy(states: dict) -> dict:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


class RngState(Callback):
    def __init__(self) -> None:
        self._trainer: Trainer | None = None
        self._saved: list[dict] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        if self._trainer is None:
            return {}
        # every rank takes part (Lightning builds the checkpoint on all ranks, rank 0 writes it)
        return {"ranks": _every_rank(_plain(_collect_rng_states()), self._trainer.world_size)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict.get("ranks")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after everything a fit does before its first batch (restoring the checkpoint included)
        saved, self._saved = self._saved, None
        if saved is not None and len(saved) == trainer.world_size:
            _set_rng_states(_numpy(saved[trainer.global_rank]))
