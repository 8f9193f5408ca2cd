"""``StepProgressBar``: Lightning's rich progress bar counting optimizer steps against ``max_steps``.

Training here is step-based over an endless stream (``max_epochs`` is -1), so Lightning's bar reads
``Epoch 0/-2`` and counts batches, which are not steps under gradient accumulation and restart from 0
after a resume. This bar reads ``Step`` and shows ``global_step / max_steps``; any other run (an epoch
budget, validation, test) looks as Lightning's does.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _show_steps(self, trainer: Trainer) -> None:
        if trainer.max_epochs != -1 or trainer.max_steps <= 0:  # an epoch budget: Lightning's bar
            return
        if self.progress is None or self.train_progress_bar_id is None:
            return
        self.progress.update(
            self.train_progress_bar_id,
            description=f"{'Step':<{len(self.validation_description)}}",
            total=trainer.max_steps,
            completed=trainer.global_step,
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)
        self.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # may make the bar
        self._show_steps(trainer)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the log directory's version: the closing line names the directory
        return metrics
