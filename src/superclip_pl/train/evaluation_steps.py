"""The validation, test and predict steps of ``LitSuperCLIP`` (a mixin: they read its ``compute_losses``,
``model`` and ``log``); the evaluation callbacks (``superclip_pl.eval``) do the rest of an evaluation."""

from __future__ import annotations

import torch


class EvaluationSteps:
    """``validation_step``, ``test_step`` and ``predict_step`` of ``LitSuperCLIP``."""

    def _evaluation_step(self, batch: dict[str, torch.Tensor] | None, stage: str) -> None:
        # a data module without a val/test source yields one empty batch, so that the loop (and the
        # evaluation callbacks at its end) still runs
        if not batch:
            return
        # A local loss: each rank's batch against itself, with no collective. The finite validation
        # streams are not in lockstep (a rank may have one batch more, or a smaller last one), so any
        # gather here would hang or crash; the logged values are averaged over all ranks' samples once,
        # at the epoch's end. With R ranks the contrastive loss is that of batches of `data.batch_size`
        # (as on one device), not of R x `data.batch_size`.
        terms = self.compute_losses(batch, gather=False)
        size = batch["input_ids"].shape[0]
        for name in ("loss", "contrastive_loss", "class_loss"):
            if name in terms:
                self.log(f"{stage}/{name}", terms[name], sync_dist=True, batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor] | None, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor] | None, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``superclip predict``: the batch's keys and L2-normalised image and caption embeddings."""
        image = self.model.encode_image(batch["pixel_values"])
        text = self.model.encode_text(batch["input_ids"], batch.get("attention_mask"))
        return {"keys": batch["keys"], "image_embeds": image, "text_embeds": text}
