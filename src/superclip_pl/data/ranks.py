"""What the data module computes across ranks: the per-device batch of a global batch, and a Python
object gathered from every rank (the stream positions a checkpoint keeps)."""

from __future__ import annotations

import torch


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global = per-device x world_size x accumulate_grad_batches, or a clear error."""
    per_step = world_size * accumulate_grad_batches
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world_size={world_size} x "
            f"accumulate_grad_batches={accumulate_grad_batches}; use a multiple of {per_step}"
        )
    return global_batch_size // per_step


def gather(obj, world_size: int) -> list:
    """`obj` from every rank (rank order); must be called by all ranks together."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]
