"""Model FLOPs of a training step, counted on the meta device (no memory, no compute).

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products (linear layers, attention,
the contrastive logits) of a forward and backward pass of a fresh copy of the model built on the meta
device, so the count costs seconds even for ViT-L and never touches the real (maybe sharded or
compiled) model. Element-wise work (norms, softmax, the loss reductions) is not counted, as usual for
model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig

from superclip_pl.losses import classification_loss, contrastive_loss
from superclip_pl.model import SuperCLIP


def training_step_flops(config: CLIPConfig, head: bool, batch_size: int, max_length: int) -> int:
    """Forward + backward FLOPs of one device's training step on ``batch_size`` image-caption pairs.

    The contrastive logits are counted for the local batch (on R ranks each rank's B x R*B logits add
    a further 4 (R - 1) B^2 E, far below 1% at any real width).
    """
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    with torch.device("meta"):
        model = SuperCLIP(config, head=head)
        pixels = torch.empty(batch_size, 3, size, size)
        ids = torch.zeros(batch_size, max_length, dtype=torch.long)
        idf = torch.ones(vocab)
    with FlopCounterMode(display=False) as counter:
        # no attention mask: HF reads its values (.item()), impossible on meta; no matmul changes shape
        out = model(pixels, ids, None)
        loss = contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        if head:
            loss = loss + classification_loss(out["vocab_logits"], ids, idf, [])
        loss.backward()
    return counter.get_total_flops()


def count_flops(module, batch: dict[str, torch.Tensor]) -> None:
    """Set ``module.flops_per_batch`` (a ``LitSuperCLIP``) for Lightning's ``ThroughputMonitor``, which
    reads it to log FLOP/s (and MFU where it knows the device's peak); counted on the meta device once
    per batch shape, and only when a ``ThroughputMonitor`` asks for it. The FLOPs are this device's:
    Throughput multiplies them by the world size for the global ``flops_per_sec`` and keeps them as they
    are for ``device/flops_per_sec`` and ``device/mfu``. Model FLOPs: with negatives across accumulation
    each micro-batch is encoded twice, but counted once."""
    if any(isinstance(c, ThroughputMonitor) for c in module.trainer.callbacks):
        set_flops_per_batch(module, batch["input_ids"].shape)


def set_flops_per_batch(module, shape: tuple[int, int]) -> None:
    """``module.flops_per_batch`` for a batch of captions of ``shape`` (B, L), counted once per shape
    (masked training steps count the kept patches: the meta model masks as the real one does)."""
    shape = tuple(shape)
    if getattr(module, "_flops_shape", None) != shape:
        head = module.model.head is not None
        module.flops_per_batch = training_step_flops(module.model.config, head, *shape)
        module._flops_shape = shape
