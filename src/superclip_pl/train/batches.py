"""What the training system reads from a batch: its size and the token ids the classification targets
come from."""

from __future__ import annotations

import torch


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a batch (for ``ThroughputMonitor(batch_size_fn=superclip_pl.batch_size)``)."""
    return batch["input_ids"].shape[0]


def class_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token ids the classification targets come from: ``class_ids`` (captions cut at
    ``class_max_length``) when the batch has them, else the text tower's ``input_ids``."""
    return batch.get("class_ids", batch["input_ids"])
