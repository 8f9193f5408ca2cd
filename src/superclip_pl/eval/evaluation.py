"""What the evaluation callbacks share: when they run, how they log, the one table they print.

When they evaluate:
- ``fit``: at the end of every validation epoch (never in the sanity check), or, with
  ``every_n_steps``, after every n-th optimizer step instead;
- ``validate`` / ``test``: once, at the end of the validation / test epoch. Lightning skips a loop
  with no batches, its hooks included, so these runs need a val / test dataloader (it may be tiny).

Each rank evaluates its own shard of the set (``loop.py``); the numbers are those of the whole set,
the same on every rank, logged as ``<prefix>/<name>/<metric>`` with ``pl_module.log``, so they reach
``trainer.callback_metrics`` (and ``metrics.json``), the loggers and checkpoint monitors. The last of
these callbacks prints one table of all of them. Each callback names its set's main metric
(``main_metric``), the one ``results.md`` reports and averages.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from superclip_pl.eval.loop import Batch, inference, shard_batches


def averaged_weights(trainer: Trainer, pl_module: LightningModule, in_training: bool):
    """The weights an evaluation during training (``every_n_steps``) sees: the averaged ones of an
    ``EMA`` callback (any callback with ``averaged_weights(pl_module)``), else the model's own. At the
    end of a validation epoch the callback has already swapped them in."""
    for callback in trainer.callbacks if in_training else []:
        if hasattr(callback, "averaged_weights"):
            return callback.averaged_weights(pl_module)
    return contextlib.nullcontext()


class SetEvaluation(Callback, ABC):
    """Scheduling, logging and printing shared by the evaluation callbacks."""

    prefix: str  # metric namespace: zeroshot, retrieval or linprobe
    task: str  # what results.md calls the evaluation, e.g. "zero-shot classification"
    _dummy_target: Any  # label or captions of the placeholder batch of a rank out of data
    needs_text = True  # the evaluation embeds text: skipped for a model that trains none (SuperClass)

    def __init__(
        self,
        name: str,
        split: str,
        batch_size: int,
        num_workers: int,
        max_samples: int | None,
        every_n_steps: int | None,
        topk: tuple[int, ...],
        main_metric: str,
    ):
        for arg, value, least in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_samples", max_samples, 1),
            ("every_n_steps", every_n_steps, 1),
        ):
            if value is not None and value < least:
                raise ValueError(f"{type(self).__name__}({name!r}): {arg}={value} must be >= {least}")
        if not name or not topk:
            raise ValueError(f"{type(self).__name__} needs a set name and a k, got {name!r} and {topk}")
        self.name, self.split = name, split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_samples, self.every_n_steps, self.topk = max_samples, every_n_steps, tuple(topk)
        if main_metric not in self.metric_names():
            raise ValueError(
                f"{type(self).__name__}({name!r}): main_metric={main_metric!r} is not one of its "
                f"metrics {self.metric_names()}"
            )
        self.main_metric = main_metric
        self.results: dict[str, float] = {}  # metric name -> value, of the last evaluation
        self._fresh = False  # results not printed yet
        self._last_step = 0  # optimizer step of the last step-driven evaluation
        self.evaluated_at: int | None = None  # optimizer step of the model behind ``results``
        self.skipped = False  # a text evaluation of a model without a trained text tower

    # -- what a subclass provides -----------------------------------------------------------------
    # _load(rank=, world_size=): the evaluation set as that rank reads it; picklable (DataLoader workers)
    _load: Callable[..., Any]

    @abstractmethod
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Metrics of the whole set, computed in lock-step on every rank."""

    def metric_names(self) -> list[str]:
        """The metrics an evaluation reports (without the ``<prefix>/<name>/`` part)."""
        return [*(f"top{k}" for k in self.topk), "mean_per_class_recall"]

    def main_result(self) -> float | None:
        """The main metric of the last evaluation; None before the first."""
        return self.results.get(f"{self.prefix}/{self.name}/{self.main_metric}")

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        twins = [c for c in trainer.callbacks if type(c) is type(self) and c.name == self.name]
        if len(twins) > 1:
            raise ValueError(
                f"{len(twins)} {type(self).__name__} callbacks are named {self.name!r}; "
                "give each set its own name (it is part of the metric names)"
            )
        hparams = getattr(pl_module, "hparams", {})
        self.skipped = self.needs_text and hparams.get("contrastive_loss_weight", 1.0) == 0
        if self.skipped and trainer.is_global_zero:
            print(
                f"{type(self).__name__}({self.name!r}) skipped: model.contrastive_loss_weight is 0 "
                "(SuperClass: no text tower is trained; its LiT stage gives zero-shot); image-only ones run"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps; stays put across the batches of an accumulation
        if self.every_n_steps and step > self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self._evaluate_and_log(trainer, pl_module, in_training=True)
        self._print_table(trainer)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.state.fn == TrainerFn.FITTING and self.every_n_steps):
            return
        self._evaluate_and_log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_and_log(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print_table(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print_table(trainer)

    # -- running, logging, printing ---------------------------------------------------------------
    def _evaluate_and_log(self, trainer: Trainer, pl_module: LightningModule, in_training=False) -> None:
        if self.skipped:
            return
        with inference(trainer, pl_module), averaged_weights(trainer, pl_module, in_training):
            values = self._evaluate(trainer, pl_module)
        self.results = {f"{self.prefix}/{self.name}/{k}": v for k, v in values.items()}
        self.evaluated_at = trainer.global_step
        self._fresh = True
        for key, value in self.results.items():
            # to callback_metrics (metrics.json, checkpoint monitors). The values are already the whole
            # set's, equal on every rank; the max over ranks keeps them bit for bit, and syncing at all
            # is what Lightning asks of epoch-level values under distributed training
            logger = False if in_training else None
            pl_module.log(key, value, logger=logger, batch_size=1, sync_dist=True, reduce_fx="max")
        if in_training:
            # from a training hook, Lightning passes values to the loggers on log_every_n_steps only
            for logger in trainer.loggers:
                logger.log_metrics(self.results, step=trainer.global_step)

    def _print_table(self, trainer: Trainer) -> None:
        """The last evaluation callback prints every one's fresh results (they all ran before it)."""
        evaluations = [c for c in trainer.callbacks if isinstance(c, SetEvaluation)]
        if self is not evaluations[-1] or not any(c._fresh for c in evaluations):
            return
        rows = {k: v for c in evaluations if c._fresh for k, v in c.results.items()}
        for c in evaluations:
            c._fresh = False
        if trainer.is_global_zero:
            width = max(map(len, rows))
            lines = [f"{'metric':<{width}}  value"] + [f"{k:<{width}}  {v:.4f}" for k, v in rows.items()]
            print(f"Evaluation at step {trainer.global_step}:\n  " + "\n  ".join(lines), flush=True)

    def _batches(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        load: Callable[..., Iterable] | None = None,
        split: str | None = None,
    ) -> Iterator[Batch]:
        """This rank's batches of ``load`` (default: the set), then placeholder batches (index -1)
        until every rank is done."""
        what = f"{self.prefix}/{self.name}, split {split or self.split!r}"
        size, target = pl_module.image_size, self._dummy_target
        load = load or self._load
        return shard_batches(load, trainer, size, self.batch_size, self.num_workers, target, what)
