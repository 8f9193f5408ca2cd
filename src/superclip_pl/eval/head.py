"""A look inside the vocabulary head: what it predicts for a few fixed validation images."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from superclip_pl.eval.loop import inference
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD


def head_report(
    tokenizer, input_ids: torch.Tensor, logits: torch.Tensor, idf: torch.Tensor, top_k: int
) -> str:
    """Markdown: per image, its caption and the head's top tokens (probability, IDF weight), the tokens
    that occur in the caption in bold."""
    probs = logits.float().softmax(dim=-1)  # (N, V)
    special = set(tokenizer.all_special_ids)
    lines = []
    for i, (ids, p) in enumerate(zip(input_ids.tolist(), probs, strict=True)):
        caption = tokenizer.decode(ids, skip_special_tokens=True)
        words = set(ids) - special
        top = p.topk(top_k)
        preds = []
        for prob, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            token = tokenizer.convert_ids_to_tokens(t).replace("</w>", "")
            token = f"**{token}**" if t in words else token
            preds.append(f"{token} {prob:.2f} (idf {float(idf[t]):.1f})")
        lines.append(f"{i}. *{caption}*  \n   → " + ", ".join(preds))
    return "\n".join(lines)


class HeadPredictions(Callback):
    """Log to TensorBoard, at each validation, a few fixed validation images with their captions and the
    vocabulary head's top predicted tokens, with their IDF weights (bold: the token is in the caption).

    Args:
        num_images: how many images of the first validation batch to show.
        top_k: predicted tokens listed per image.
    """

    def __init__(self, num_images: int = 8, top_k: int = 8):
        if num_images < 1 or top_k < 1:
            raise ValueError(f"num_images={num_images} and top_k={top_k} must both be >= 1")
        self.num_images, self.top_k = num_images, top_k

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or not batch or trainer.sanity_checking or pl_module.model.head is None:
            return
        n = min(self.num_images, batch["input_ids"].shape[0])
        pixels, ids = batch["pixel_values"][:n], batch["input_ids"][:n]
        with inference(trainer, pl_module):  # every rank runs it: under FSDP a forward is a collective
            logits = pl_module.model(pixels, ids, batch["attention_mask"][:n])["vocab_logits"]
        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            rank_zero_warn("HeadPredictions logs to TensorBoard; no TensorBoardLogger is configured")
            return
        report = head_report(pl_module.tokenizer, ids, logits, pl_module.doc_freq.idf(), self.top_k)
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        images = (pixels.float() * std + mean).clamp(0, 1).cpu()
        step = trainer.global_step
        logger.experiment.add_images("head/images", images, step)
        logger.experiment.add_text("head/predictions", report, step)
