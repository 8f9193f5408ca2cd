"""``LitSuperCLIP``: the Lightning system around ``SuperCLIP`` (steps, gathering, accumulation, logging)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from superclip_pl.head_file import read_extras
from superclip_pl.losses import DocumentFrequency, classification_loss, contrastive_loss, siglip_loss
from superclip_pl.model import PRESETS, SuperCLIP
from superclip_pl.tokenizer import load_tokenizer
from superclip_pl.train.accumulation import (
    NegativesCache,
    cached_backward,
    choose_optimisation,
    forget_logged_step_values,
)
from superclip_pl.train.batches import batch_size, class_targets
from superclip_pl.train.evaluation_steps import EvaluationSteps
from superclip_pl.train.flops import count_flops
from superclip_pl.train.nonfinite import NonFiniteSteps
from superclip_pl.train.optim import clamp_logit_scale, configure_adamw, param_groups, warmup_cosine
from superclip_pl.train.rng import RngState
from superclip_pl.train.schedules import check_lr_settings
from superclip_pl.train.sharding import encoder_layers, shard
from superclip_pl.train.towers import lock_towers

__all__ = ["LitSuperCLIP", "batch_size", "class_targets", "param_groups", "warmup_cosine"]


class LitSuperCLIP(EvaluationSteps, LightningModule):
    """SuperCLIP training: contrastive loss + ``class_loss_weight`` x vocabulary classification loss.

    Args:
        tokenizer: tokenizer name or directory (linked from ``data.tokenizer``); sizes the text tower and
            the head, and gives the special tokens the classification ignores.
        backbone: architecture preset (``tiny``, ``ViT-B-16``, ``ViT-L-16``: fresh weights) or a pretrained
            HF CLIP model (hub id or local directory) to fine-tune from.
        backbone_config: overrides of the preset's ``CLIPConfig`` fields, e.g.
            ``{vision_config: {num_hidden_layers: 2}}``.
        image_size: input resolution; None keeps the backbone's (fed to ``data.image_size``). A pretrained
            backbone at another size gets its position embeddings resampled (``superclip_pl.resolution``).
        max_length: caption length in tokens (linked from ``data.max_length``).
        class_max_length: tokens of the caption the classification targets (and document frequencies)
            come from; None: ``max_length`` (the reference). Longer detailed captions then feed the head
            in full while the text tower still sees ``max_length`` (linked to ``data.class_max_length``).
        class_loss_weight: weight of the classification loss; 0 trains plain CLIP (no head is built).
        contrastive_loss_weight: weight of the contrastive loss; 0 trains SuperClass (the image tower with
            the classification loss alone; the text tower does not run, zero-shot evaluations are skipped).
        head_pooling: what the head averages: ``all_patches`` or ``skip_first_patch`` (the reference
            before its fix, as the released checkpoints were trained); None: what the backbone directory
            records (``superclip import --head_pooling``), else ``all_patches``.
        lock_image: freeze the image tower (LiT): no gradient, no optimizer state, weights unchanged.
        lock_image_unlocked_layers: with ``lock_image``, top groups left trainable, counted as open_clip
            counts them: 1 the projection, 2 also the last block and the final LayerNorm, and so on.
        lock_text: freeze the text tower.
        lock_text_unlocked_layers: with ``lock_text``, top groups left trainable (as above).
        image_layer_decay: layer-wise lr decay of the image tower: lr x decay ** depth (the projection 0,
            the top block 1, ..., the embeddings deepest); None: none.
        text_layer_decay: the same for the text tower.
        loss: ``contrastive`` (symmetric InfoNCE) or ``siglip`` (sigmoid loss with a learnable bias).
        lr: peak learning rate of AdamW.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay on weight matrices (none on biases, norms, logit scale).
        warmup_steps: optimizer steps of linear warm-up before the schedule.
        min_lr_ratio: final learning rate of the cosine (or the cool-down), as a fraction of ``lr``.
        lr_schedule: ``cosine`` to ``max_steps``; ``constant`` (a run that can be extended); or
            ``constant_cooldown``: constant, then down over the last ``cooldown_steps`` (open_clip's).
        cooldown_steps: ``constant_cooldown``: optimizer steps of the cool-down at the end of ``max_steps``.
        cooldown_power: ``constant_cooldown``: shape of the cool-down (1 linear, as open_clip's default).
        gradient_checkpointing: recompute encoder activations in the backward pass to save memory.
        compile: ``torch.compile`` each encoder layer (after sharding, under FSDP2).
        accumulated_negatives: with ``trainer.accumulate_grad_batches`` K > 1, compute the contrastive
            (or SigLIP) loss of an optimizer step over the features of all its K micro-batches and all
            ranks (the batch the step trains with is K x devices x ``data.batch_size``), with the
            activation memory of one micro-batch (gradient caching, see ``superclip_pl.train.accumulation``).
            False: Lightning's accumulation, a loss per micro-batch (negatives: one micro-batch).
        max_nonfinite_steps: optimizer steps in a row with a non-finite loss or gradients that are skipped
            (no update; ``train/nonfinite_steps``); one more stops the run, exit 1 (``train/nonfinite.py``).
        patch_dropout: fraction of each training image's patches dropped (FLIP, 0.5 or 0.75; the head
            averages the kept ones); evaluation is unmasked. None: the backbone's (an imported open_clip
            config's ``patch_dropout``), else 0. Resuming with 0 is FLIP's unmasked tuning.
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
        contrastive_loss_weight: float = 1.0,
        head_pooling: Literal["all_patches", "skip_first_patch"] | None = None,
        lock_image: bool = False,
        lock_image_unlocked_layers: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        image_layer_decay: float | None = None,
        text_layer_decay: float | None = None,
        loss: Literal["contrastive", "siglip"] = "contrastive",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.2,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "constant", "constant_cooldown"] = "cosine",
        cooldown_steps: int | None = None,
        cooldown_power: float = 1.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        accumulated_negatives: bool = True,
        max_nonfinite_steps: int = 5,
        patch_dropout: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if class_loss_weight < 0 or contrastive_loss_weight < 0:
            raise ValueError(
                f"class_loss_weight={class_loss_weight}, contrastive_loss_weight={contrastive_loss_weight}: "
                "both must be >= 0 (0 drops that loss)"
            )
        check_lr_settings(self.hparams)
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = SuperCLIP.build(
            backbone,
            self.tokenizer,
            image_size=image_size,
            overrides=backbone_config,
            head=class_loss_weight > 0,
            siglip=loss == "siglip",
            head_pooling=head_pooling,
            patch_dropout=patch_dropout,
        )
        self.hparams.head_pooling = self.model.head_pooling  # resolved: what export records
        lock_towers(self.model, self.hparams)
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
        self._cache = NegativesCache()

    # -- the step ---------------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All features of the global batch (R*B, E), with gradients flowing back to their rank."""
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=True).flatten(0, 1)

    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return self.model(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))

    def contrastive_term(self, out: dict[str, torch.Tensor | None], gather: bool = True) -> torch.Tensor:
        """The contrastive (or SigLIP) loss of this rank's features against those of all ranks
        (``gather=False``: against this rank's own, with no collective)."""
        image, text, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
        everyone = self._gather if gather else (lambda x: x)
        offset = self.global_rank * image.shape[0] if gather else 0
        if self.hparams.loss == "siglip":
            return siglip_loss(image, text, scale, out["logit_bias"], everyone(text), offset)
        return contrastive_loss(image, text, scale, everyone(image), everyone(text), offset)

    def compute_losses(self, batch: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch, with the IDF weights as they stand; ``gather=False``: this
        rank's batch alone (no collective)."""
        hp = self.hparams
        if not hp.contrastive_loss_weight:  # SuperClass: the image tower and the head alone
            out = self.model(batch["pixel_values"], None)
            idf = self.doc_freq.idf()
            cls = classification_loss(out["vocab_logits"], class_targets(batch), idf, self.ignore_ids)
            return {"class_loss": cls, "loss": hp.class_loss_weight * cls}
        out = self._forward(batch)
        con = self.contrastive_term(out, gather)
        terms = {"contrastive_loss": con, "loss": hp.contrastive_loss_weight * con}
        if self.doc_freq is not None:
            cls = classification_loss(
                out["vocab_logits"], class_targets(batch), self.doc_freq.idf(), self.ignore_ids
            )
            terms["class_loss"] = cls
            terms["loss"] = terms["loss"] + hp.class_loss_weight * cls
        terms["logit_scale"] = out["logit_scale"].detach()
        return terms

    # -- training ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            choose_optimisation(self)

    def configure_callbacks(self) -> list:
        # in any fit (CLI or Python): non-finite steps skipped, global RNGs saved with each checkpoint
        return [NonFiniteSteps(self.hparams.max_nonfinite_steps), RngState()]

    def teardown(self, stage: str) -> None:
        self._cache.clear()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if not self.automatic_optimization:
            forget_logged_step_values(self.trainer)
        count_flops(self, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.doc_freq is not None:  # weights over the run so far, the current global batch included
            self.doc_freq.update(class_targets(batch), self.ignore_ids)
        size = batch["input_ids"].shape[0]
        self.samples_seen += size * self.trainer.world_size
        if self.automatic_optimization:
            terms = self.compute_losses(batch)
        else:
            terms = self._accumulated_step(batch)
            if terms is None:  # more micro-batches to come in this step
                return None
            size = sum(b["input_ids"].shape[0] for b in self._cache.batches)
            self._cache.clear()
        for name, value in terms.items():
            self.log(
                f"train/{name}",
                value,
                prog_bar=name == "loss",
                sync_dist=name != "logit_scale",
                batch_size=size,
            )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        self.log("train/samples_seen", self.samples_seen.float(), batch_size=size)
        if not self.automatic_optimization:
            self._optimizer_step()
        return terms["loss"]

    def _accumulated_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Encode the micro-batch without a graph; at the step's last one, backpropagate the loss of all."""
        self._cache.encode(batch, self._forward)
        # the step ends where Lightning's own accumulation would end it (K micro-batches or the epoch's end)
        if self.trainer.fit_loop._should_accumulate():
            return None
        idf = self.doc_freq.idf() if self.doc_freq is not None else None
        return cached_backward(self, self._cache, class_targets, idf)

    def _optimizer_step(self) -> None:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        if self.trainer.gradient_clip_val:  # Lightning clips only in automatic optimisation
            self.clip_gradients(
                optimizer, self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
            )
        optimizer.step()
        clamp_logit_scale(self.model.clip.logit_scale)
        optimizer.zero_grad()
        schedule.step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # Lightning's (automatic) step, then the reference's clamp
        clamp_logit_scale(self.model.clip.logit_scale)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saved_at = self.global_step

    # -- optimisation, sharding (ModelParallelStrategy: FSDP2 on any device) and compilation -------
    def configure_optimizers(self):
        return configure_adamw(self)  # AdamW groups, layer-wise lr decay, the schedule over max_steps

    def configure_model(self) -> None:
        # Lightning calls this at every fit / validate / test: it must be idempotent
        shard(self.model, self.device_mesh)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for layer in encoder_layers(self.model):
                layer.compile()  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True
