"""``EMA``: an exponential moving average of the trained weights, evaluated, checkpointed and exported.

Lightning 2.6 ships ``EMAWeightAveraging`` (``callbacks/weight_averaging.py``); this callback keeps its
checkpoint layout (``state_dict``: the averaged weights, which ``validate``, ``test`` and ``superclip
export`` then read; ``current_model_state``: the raw ones a resumed fit continues from) and differs where
that one does not serve here:
- it averages only the trainable parameters (a LiT run's locked tower is not copied: it never moves)
  and with ``torch._foreach_lerp_`` (one kernel; a weight that does not move stays bit for bit), where
  ``AveragedModel`` deep-copies the whole module and loops over its tensors in Python;
- buffers are never averaged: the IDF counts (integers) stay the run's counts, where the default
  ``use_buffers=True`` would average and truncate them;
- every evaluation sees the averaged weights: those at the end of a validation epoch whatever the
  callbacks' order (the swap back waits for ``on_validation_end``; Lightning's swaps back in its own
  ``on_validation_epoch_end``, before the callbacks listed after it evaluate), and those during
  training (``every_n_steps``, through ``averaged_weights``);
- after the fit the module holds the averaged weights (as Lightning's) and the raw ones are kept, so
  that the final checkpoint still holds both.
Sharded training (FSDP, FSDP2) is refused with one line, as Lightning's warns that it does not shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn

RAW_KEY = "current_model_state"  # Lightning's WeightAveraging name for the raw weights in a checkpoint


class EMA(Callback):
    """Exponential moving average of the trainable weights, updated after every optimizer step:
    ``average = decay x average + (1 - decay) x weights`` (the first update copies the weights). Evaluations
    run on the average; checkpoints hold both (``superclip export`` writes the average, ``--weights raw``
    the raw weights).

    Args:
        decay: weight of the average so far at each update (0.9999 is a common choice for long runs;
            the average then spans about 1 / (1 - decay) updates).
        update_every_n_steps: update after every this many optimizer steps.
        update_starting_at_step: first optimizer step averaged (the average starts as a copy then).
    """

    def __init__(
        self, decay: float = 0.9999, update_every_n_steps: int = 1, update_starting_at_step: int = 0
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA: decay={decay} must be in [0, 1)")
        if update_every_n_steps < 1 or update_starting_at_step < 0:
            raise ValueError(
                f"EMA: update_every_n_steps={update_every_n_steps} must be >= 1 and "
                f"update_starting_at_step={update_starting_at_step} >= 0"
            )
        self.decay, self.every, self.start = decay, update_every_n_steps, update_starting_at_step
        self.names: list[str] = []  # the averaged (trainable) parameters, by name
        self.average: list[torch.Tensor] | None = None  # as `names`; the raw weights while swapped in
        self.updates = 0
        self.updated_at = -1  # optimizer step of the last update
        self._pending: dict[str, torch.Tensor] | None = None  # averaged weights of a resumed checkpoint
        self._swapped = False  # the module holds the averaged weights, `average` the raw ones
        self._swapped_for_validation = False

    # -- the average ------------------------------------------------------------------------------
    def _params(self, pl_module: LightningModule) -> list[torch.Tensor]:
        params = dict(pl_module.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def _swap(self, pl_module: LightningModule) -> None:
        for kept, param in zip(self.average, self._params(pl_module), strict=True):
            raw = param.detach().clone()
            param.copy_(kept)
            kept.copy_(raw)
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def averaged_weights(self, pl_module: LightningModule) -> Iterator[None]:
        """The module holds the averaged weights inside (the raw ones again after)."""
        swap = self.average is not None and not self._swapped
        if swap:
            self._swap(pl_module)
        try:
            yield
        finally:
            if swap:
                self._swap(pl_module)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise ValueError(
                f"EMA does not support sharded training ({type(trainer.strategy).__name__}): it keeps "
                "whole tensors; use the ddp strategy or drop the EMA callback"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if self._pending is not None:  # resumed: the checkpoint's average, on the parameters' devices
            params = self._params(pl_module)
            self.average = [self._pending[n].to(p) for n, p in zip(self.names, params, strict=True)]
            self._pending = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done; the same over an accumulation's micro-batches
        if step <= self.updated_at or step - 1 < self.start or (step - 1 - self.start) % self.every:
            return
        params = [p.detach() for p in self._params(pl_module)]
        if self.average is None or self.updates == 0:
            self.average = [p.clone() for p in params]
        else:
            torch._foreach_lerp_(self.average, params, 1.0 - self.decay)
        self.updates += 1
        self.updated_at = step

    # -- evaluation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.average is not None and not self._swapped:
            self._swap(pl_module)
            self._swapped_for_validation = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._swapped_for_validation:
            self._swapped_for_validation = False
            self._swap(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.average is not None and not self._swapped:
            self._swap(pl_module)  # the fit's result is the average; the raw weights stay for checkpoints

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "updated_at": self.updated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict.get("updates", 0)
        self.updated_at = state_dict.get("updated_at", -1)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.average is None:  # nothing averaged yet: the weights are the average
            return
        state = checkpoint["state_dict"]
        other = dict(state)  # the same tensors but the averaged ones: torch.save writes each tensor once
        other.update(zip(self.names, self.average, strict=True))
        averaged, raw = (state, other) if self._swapped else (other, state)
        checkpoint["state_dict"], checkpoint[RAW_KEY] = averaged, raw

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # validate / test / export evaluate the average (`state_dict`); a resumed fit continues the raw
        # weights (Lightning has loaded `state_dict` into the module already) and the average
        if trainer.state.fn != TrainerFn.FITTING or RAW_KEY not in checkpoint:
            return
        self._pending = dict(checkpoint["state_dict"])
        pl_module.load_state_dict(checkpoint[RAW_KEY])
