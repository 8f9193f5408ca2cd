"""``LitSuperCLIP``: the Lightning system around ``SuperCLIP`` (steps, gathering, optimiser, logging)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from superclip_pl.clipdir import read_extras
from superclip_pl.flops import training_step_flops
from superclip_pl.losses import DocumentFrequency, classification_loss, contrastive_loss, siglip_loss
from superclip_pl.model import PRESETS, SuperCLIP
from superclip_pl.tokenizer import load_tokenizer


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a batch (for ``ThroughputMonitor(batch_size_fn=superclip_pl.module.batch_size)``)."""
    return batch["input_ids"].shape[0]


def class_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token ids the classification targets come from: ``class_ids`` (captions cut at
    ``class_max_length``) when the batch has them, else the text tower's ``input_ids``."""
    return batch.get("class_ids", batch["input_ids"])


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices; none on biases, norms, the class token, logit scale and bias."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LitSuperCLIP(LightningModule):
    """SuperCLIP training: contrastive loss + ``class_loss_weight`` x vocabulary classification loss.

    Args:
        tokenizer: tokenizer name or directory (linked from ``data.tokenizer``); sizes the text tower and
            the head, and gives the special tokens the classification ignores.
        backbone: architecture preset (``tiny``, ``ViT-B-16``, ``ViT-L-16``: fresh weights) or a pretrained
            HF CLIP model (hub id or local directory) to fine-tune from.
        backbone_config: overrides of the preset's ``CLIPConfig`` fields, e.g.
            ``{vision_config: {num_hidden_layers: 2}}``.
        image_size: input resolution; None keeps the backbone's (fed to ``data.image_size``).
        max_length: caption length in tokens (linked from ``data.max_length``).
        class_max_length: tokens of the caption the classification targets (and document frequencies)
            come from; None: ``max_length`` (the reference). Longer detailed captions then feed the head
            in full while the text tower still sees ``max_length`` (linked to ``data.class_max_length``).
        class_loss_weight: weight of the classification loss; 0 trains plain CLIP (no head is built).
        loss: ``contrastive`` (symmetric InfoNCE) or ``siglip`` (sigmoid loss with a learnable bias).
        lr: peak learning rate of AdamW.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay on weight matrices (none on biases, norms, logit scale).
        warmup_steps: optimizer steps of linear warm-up before the cosine decay.
        min_lr_ratio: final learning rate of the cosine, as a fraction of ``lr``.
        gradient_checkpointing: recompute encoder activations in the backward pass to save memory.
        compile: ``torch.compile`` each encoder layer (after sharding, under FSDP2).
        local_loss: compute each rank's loss on its own rows against the gathered columns (open_clip's
            local loss: O(B x R*B) logits per rank, and the same gradients as the global loss).
    """

    def __init__(
        self,
        tokenizer: str,
        backbone: str = "tiny",
        backbone_config: dict[str, Any] | None = None,
        image_size: int | None = None,
        max_length: int = 77,
        class_max_length: int | None = None,
        class_loss_weight: float = 1.0,
        loss: Literal["contrastive", "siglip"] = "contrastive",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.2,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if class_loss_weight < 0:
            raise ValueError(f"class_loss_weight={class_loss_weight} must be >= 0 (0 trains plain CLIP)")
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = SuperCLIP.build(
            backbone,
            self.tokenizer,
            image_size=image_size,
            overrides=backbone_config,
            head=class_loss_weight > 0,
            siglip=loss == "siglip",
        )
        if max_length > self.model.config.text_config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds the text tower's "
                f"{self.model.config.text_config.max_position_embeddings} positions"
            )
        if class_max_length is not None and class_max_length < 1:
            raise ValueError(f"class_max_length={class_max_length} must be >= 1 (or null: max_length)")
        if gradient_checkpointing:
            self.model.clip.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.image_size = self.model.image_size
        self.max_length = max_length
        self.ignore_ids = sorted(set(self.tokenizer.all_special_ids))
        self.doc_freq = DocumentFrequency(self.model.vocab_size) if self.model.head is not None else None
        counts = read_extras(backbone)[1] if self.doc_freq is not None and backbone not in PRESETS else None
        if counts is not None:  # a backbone dir `superclip import` wrote: the run goes on from its counts
            self.doc_freq.load_state_dict(counts)
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))
        # optimizer steps of the last validation and the last checkpoint: the CLI makes sure that
        # a fit ends with an evaluation and a checkpoint of its final model
        self.validated_at: int | None = None
        self.saved_at: int | None = None

    # -- the step ---------------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All features of the global batch (R*B, E), with gradients flowing back to their rank."""
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=True).flatten(0, 1)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch, with the IDF weights as they stand."""
        out = self.model(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))
        image, text = out["image_embeds"], out["text_embeds"]
        offset = self.trainer.global_rank * image.shape[0]
        if self.hparams.loss == "siglip":
            con = siglip_loss(image, text, out["logit_scale"], out["logit_bias"], self._gather(text), offset)
        else:
            con = contrastive_loss(
                image, text, out["logit_scale"], self._gather(image), self._gather(text), offset
            )
        terms = {"contrastive_loss": con, "loss": con}
        if self.doc_freq is not None:
            cls = classification_loss(
                out["vocab_logits"], class_targets(batch), self.doc_freq.idf(), self.ignore_ids
            )
            terms["class_loss"] = cls
            terms["loss"] = con + self.hparams.class_loss_weight * cls
        terms["logit_scale"] = out["logit_scale"].detach()
        return terms

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Lightning's ThroughputMonitor reads `flops_per_batch` to log FLOP/s (and MFU where it knows the
        # device's peak); counted on the meta device once per batch shape, and only when it is asked for.
        # Its Throughput divides the FLOPs it is given by the world size for the per-device figures, so
        # they are those of the global batch: this rank's step x world size.
        if not any(isinstance(c, ThroughputMonitor) for c in self.trainer.callbacks):
            return
        shape = tuple(batch["input_ids"].shape)
        if getattr(self, "_flops_shape", None) != shape:
            head = self.model.head is not None
            flops = training_step_flops(self.model.config, head, *shape)
            self.flops_per_batch = flops * self.trainer.world_size
            self._flops_shape = shape

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.doc_freq is not None:  # weights over the run so far, the current global batch included
            self.doc_freq.update(class_targets(batch), self.ignore_ids)
        terms = self.compute_losses(batch)
        batch_size = batch["input_ids"].shape[0]
        self.samples_seen += batch_size * self.trainer.world_size
        for name, value in terms.items():
            self.log(
                f"train/{name}",
                value,
                prog_bar=name == "loss",
                sync_dist=name != "logit_scale",
                batch_size=batch_size,
            )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.log("train/samples_seen", self.samples_seen.float(), batch_size=batch_size)
        return terms["loss"]

    def _evaluation_step(self, batch: dict[str, torch.Tensor] | None, stage: str) -> None:
        # a data module without a val/test source yields one empty batch, so that the loop (and the
        # evaluation callbacks at its end) still runs
        if not batch:
            return
        terms = self.compute_losses(batch)
        size = batch["input_ids"].shape[0]
        for name in ("loss", "contrastive_loss", "class_loss"):
            if name in terms:
                self.log(f"{stage}/{name}", terms[name], sync_dist=True, batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor] | None, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saved_at = self.global_step

    def test_step(self, batch: dict[str, torch.Tensor] | None, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``superclip predict``: the batch's keys and L2-normalised image and caption embeddings."""
        image = self.model.encode_image(batch["pixel_values"])
        text = self.model.encode_text(batch["input_ids"], batch.get("attention_mask"))
        return {"keys": batch["keys"], "image_embeds": image, "text_embeds": text}

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self, hp.weight_decay)
        # the fused kernel updates all tensors at once: on CPU ~7x faster than the default per-tensor
        # loop, which matters for the head's vocab x width matrix (49408 x 768 for B/16)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, fused=fused)
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- sharding (ModelParallelStrategy: FSDP2 on any device, CPU included) and compilation ------
    def _encoder_layers(self) -> list[nn.Module]:
        clip = self.model.clip
        return [*clip.vision_model.encoder.layers, *clip.text_model.encoder.layers]

    def configure_model(self) -> None:
        # Lightning calls this at every fit / validate / test: it must be idempotent
        self._shard()
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for layer in self._encoder_layers():
                layer.compile()  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True

    def _shard(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):
            return
        dp_mesh = mesh["data_parallel"]
        for layer in self._encoder_layers():
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)
        # evaluation calls these instead of forward: they must gather the sharded root parameters too
        register_fsdp_forward_method(self.model, "encode_image")
        register_fsdp_forward_method(self.model, "encode_text")
