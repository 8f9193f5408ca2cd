"""``GracefulStop``: SIGTERM and SIGINT end a fit at the end of the optimizer step in progress, with
``last.ckpt`` written, on every rank at the same step.

What schedulers do: SLURM (at a time limit, preemption or ``scancel``), Kubernetes (pod eviction),
spot instances and ``docker stop`` send SIGTERM, wait a grace period (SLURM's KillWait: 30 s by
default; Kubernetes: 30 s), then SIGKILL. Ctrl-C is SIGINT. Lightning on its own exits with status 0
and no checkpoint on SIGTERM (a job manager then records success) and with 1 on Ctrl-C.

Here the first of either signal only sets a flag. At the end of each optimizer step the ranks take
the largest flag (one all-reduce of one integer; none on a single device), so that every rank stops
after the same step even when the signal reached one of them, or reached them during different
steps. Then the model, optimizer, schedule, data position and RNG states are written to
``last.ckpt`` (atomically: ``train/checkpoint_io.py``) and ``SignalStop`` is raised: ``superclip``
prints one line (the checkpoint and the command that resumes it) and exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT), the status the shell reports for a process that the signal
ended. A second signal while the first is being handled gets its default action at once (the
process ends without a checkpoint; the previous ``last.ckpt`` stays whole).

DataLoader workers ignore both signals (``data/loader.py``): a scheduler signals every process of a
job, and a worker ended by it would make the main process fail before it could save.
Lightning's SLURM auto-requeue (its own signal, SIGUSR1 by default) is left as Lightning handles it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from superclip_pl.errors import SignalStop

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def checkpoint_dir(trainer: Trainer) -> str:
    """The folder the run's checkpoints go to: the first ModelCheckpoint's, else
    ``<log dir>/checkpoints`` (Lightning's default)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    return os.path.join(str(trainer.log_dir or trainer.default_root_dir), "checkpoints")


def last_checkpoint_path(trainer: Trainer) -> str:
    """Where ``last.ckpt`` goes (``ModelCheckpoint.CHECKPOINT_NAME_LAST`` in the checkpoint folder)."""
    callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    name = (callback or ModelCheckpoint).CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
    return os.path.join(checkpoint_dir(trainer), name)


def mark_saved(trainer: Trainer, path: str) -> None:
    """Tell the ModelCheckpoint callbacks that this step is saved (no second save of the same step)
    and that ``path`` is their last checkpoint."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback._last_global_step_saved = trainer.global_step
            if callback.save_last:
                callback.last_model_path = path


class GracefulStop(Callback):
    """Stop a fit on SIGTERM / SIGINT at the end of the optimizer step, with ``last.ckpt`` written."""

    def __init__(self) -> None:
        self.received = 0  # the signal this process got (0: none yet)
        self._previous: dict[int, object] = {}
        self._step: int | None = None

    def _handler(self, signum: int, frame) -> None:
        if self.received:  # the second signal: its default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        name = signal.Signals(signum).name
        print(
            f"{name} received: stopping at the end of this optimizer step with a checkpoint "
            f"({name} again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's own handlers (registered when the fit starts), which ours replace for these two
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        if trainer.global_step == self._step:  # a micro-batch inside an optimizer step
            return
        self._step = trainer.global_step
        flag = torch.tensor(self.received, device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        mark_saved(trainer, path)
        self._restore()
        raise SignalStop(signum, trainer.global_step, path, quiet=not trainer.is_global_zero)
