"""``Resume``: what a fit resumed from a checkpoint continues exactly as an uninterrupted run would.

- The loggers' step labels continue without overlap: Lightning restores its logging counter one short
  of the steps done when the checkpoint was saved after a validation; it is the step count again.
- Lightning's progress bars count the epoch's batches from its start, so their total is the epoch's too
  (Lightning gives it the steps left: 16/8 after a resume at step 8 of 16); ``StepProgressBar``, the
  CLI's default, counts steps itself.
- A resume that changes the optimisation mode (accumulation with negatives across it <-> without)
  keeps the step count (``continue_step_count``).
- When ``max_steps`` differs from the checkpoint's run, one line says what happens to the learning-rate
  schedule, and training starts at the new schedule's rate (not at the rate the old one had reached,
  0 at the end of a cosine, for one step before a jump).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from superclip_pl.train.progress import StepProgressBar


def continue_step_count(trainer: Trainer, automatic: bool) -> None:
    """Lightning counts optimizer steps in one of two loops, automatic or manual optimisation, and
    restores both from a checkpoint; a run resumed in the other mode (``accumulate_grad_batches`` 1 <->
    K with negatives across accumulation, or ``model.accumulated_negatives`` toggled) would start again
    at step 0 and train ``max_steps`` more. The loop in use continues from the steps done in either."""
    loop = trainer.fit_loop.epoch_loop
    counters = [
        loop.automatic_optimization.optim_progress.optimizer.step.total,
        loop.manual_optimization.optim_step_progress.total,
    ]
    done = max(c.completed for c in counters)
    mine = counters[0 if automatic else 1]
    if mine.completed < done:
        mine.ready = mine.completed = done


class Resume(Callback):
    def __init__(self) -> None:
        self._first_batch = True
        self._fix_bar = False
        self._trainer: Trainer | None = None
        self._saved_max_steps: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        return {"max_steps": self._trainer.max_steps} if self._trainer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_max_steps = state_dict.get("max_steps")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._fix_bar:
            return
        # a resumed (mid-epoch) fit: the bar, made at its first batch, counts the epoch's batches
        # (batch_idx + 1) against the steps left; its total is the epoch's batches up to max_steps
        self._fix_bar = False
        done, bar = batch_idx + 1, trainer.progress_bar_callback
        total = done + trainer.max_steps - trainer.global_step
        if isinstance(bar, StepProgressBar):  # counts steps itself
            return
        if (
            isinstance(bar, RichProgressBar)
            and bar.progress is not None
            and bar.train_progress_bar_id is not None
        ):
            bar.progress.update(bar.train_progress_bar_id, total=total, completed=done)
        elif isinstance(bar, TQDMProgressBar) and bar._train_progress_bar is not None:
            bar._train_progress_bar.total, bar._train_progress_bar.n = total, done
            bar._train_progress_bar.refresh()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self._first_batch:  # at a step boundary: the logging counter equals the optimizer steps done
            self._first_batch = False
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_batch = True
        continue_step_count(trainer, pl_module.automatic_optimization)
        resumed = trainer.fit_loop.epoch_loop.batch_progress.current.ready > 0
        self._fix_bar = resumed and trainer.max_epochs == -1 and trainer.max_steps > 0
        before, now = self._saved_max_steps, trainer.max_steps
        self._saved_max_steps = None
        if before is None or before == now:
            return
        rates = []
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is None:  # not a LambdaLR: its own state decides
                continue
            # the rates of the schedule over the new max_steps at the step reached (LambdaLR keeps its
            # step and base rates in the checkpoint, and takes its function from the new run)
            new = [
                base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, lambdas, strict=True)
            ]
            old = [group["lr"] for group in scheduler.optimizer.param_groups]
            for group, lr in zip(scheduler.optimizer.param_groups, new, strict=True):
                group["lr"] = lr
            scheduler._last_lr = new
            rates.append((old[0], new[0]))
        change = f": lr {rates[0][0]:.3g} -> {rates[0][1]:.3g} at this step" if rates else ""
        if not trainer.is_global_zero:
            return
        print(
            f"resuming at step {trainer.global_step} with max_steps={now} (the checkpoint's run had "
            f"{before}): the warm-up + {pl_module.hparams.get('lr_schedule', 'cosine')} schedule now runs "
            f"over {now} steps{change}"
        )
