"""``AtomicCheckpointIO``: a checkpoint file is whole or absent, whatever kills the process while it writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, whose local files are
written to the system's temporary directory and moved into place when complete. On a cluster the
temporary directory is usually another file system than the checkpoints (local disk or tmpfs
against a shared one), and a move across file systems is a copy into the destination: a kill during
that copy leaves a truncated ``last.ckpt`` where a good one was (and a large checkpoint may not fit
in ``/tmp`` at all). Here a local checkpoint is written next to its destination under a hidden
temporary name (``.last.ckpt.tmp-PID``), flushed to disk, and renamed over it (``os.replace``: atomic
within a file system). Object stores (``s3://``, ``gs://``, ...) need nothing more: Lightning uploads
the whole file in one request, and an object appears only once its upload is complete.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        folder, name = os.path.split(local)
        os.makedirs(folder or ".", exist_ok=True)
        for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp-*")):  # from a killed write
            with contextlib.suppress(OSError):
                os.remove(stale)
        temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise


def use_atomic_checkpoints(trainer) -> None:
    """Give the trainer's strategy ``AtomicCheckpointIO`` when it uses Lightning's plain one (a custom or
    asynchronous CheckpointIO, and sharded strategies' own writers, are left alone)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
