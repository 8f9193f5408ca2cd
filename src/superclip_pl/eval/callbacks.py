"""Zero-shot classification and image-text retrieval as Lightning callbacks.

When they evaluate:
- ``fit``: at the end of every validation epoch (never in the sanity check), or, with
  ``every_n_steps``, after every n-th optimizer step instead;
- ``validate`` / ``test``: once, at the end of the validation / test epoch. Lightning skips a loop
  with no batches, its hooks included, so these runs need a val / test dataloader (it may be tiny).

Each rank evaluates its own shard of the set (``evalloop``); the numbers are those of the whole set,
the same on every rank, logged as ``zeroshot/<name>/top1`` ... and ``retrieval/<name>/i2t_R@1`` ...
with ``pl_module.log``, so they reach ``trainer.callback_metrics`` (and ``metrics.json``), the
loggers and checkpoint monitors. The last of these callbacks prints one table of all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from superclip_pl.eval.hfsets import load_hf_classification_set
from superclip_pl.eval.loop import (
    Batch,
    encode_images,
    encode_texts,
    gather_rows,
    inference,
    shard_batches,
)
from superclip_pl.eval.metrics import (
    DEFAULT_TEMPLATES,
    build_classifier,
    gathered_classification_metrics,
    gathered_retrieval_metrics,
)
from superclip_pl.eval.sets import load_classification_set, load_retrieval_set


class SetEvaluation(Callback, ABC):
    """Scheduling, logging and printing shared by the evaluation callbacks."""

    prefix: str  # metric namespace: zeroshot or retrieval
    _dummy_target: Any  # label or captions of the placeholder batch of a rank out of data

    def __init__(
        self,
        name: str,
        split: str,
        batch_size: int,
        num_workers: int,
        max_samples: int | None,
        every_n_steps: int | None,
        topk: tuple[int, ...],
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
        self.results: dict[str, float] = {}  # metric name -> value, of the last evaluation
        self._fresh = False  # results not printed yet
        self._last_step = 0  # optimizer step of the last step-driven evaluation
        self.evaluated_at: int | None = None  # optimizer step of the model behind ``results``

    # -- what a subclass provides -----------------------------------------------------------------
    # _load(rank=, world_size=): the evaluation set as that rank reads it; picklable (DataLoader workers)
    _load: Callable[..., Any]

    @abstractmethod
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Metrics of the whole set, computed in lock-step on every rank."""

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        twins = [c for c in trainer.callbacks if type(c) is type(self) and c.name == self.name]
        if len(twins) > 1:
            raise ValueError(
                f"{len(twins)} {type(self).__name__} callbacks are named {self.name!r}; "
                "give each set its own name (it is part of the metric names)"
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
        with inference(trainer, pl_module):
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

    def _batches(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[Batch]:
        """This rank's batches, then placeholder batches (index -1) until every rank is done."""
        what = f"{self.prefix}/{self.name}, split {self.split!r}"
        size, target = pl_module.image_size, self._dummy_target
        return shard_batches(self._load, trainer, size, self.batch_size, self.num_workers, target, what)


class ZeroShotClassification(SetEvaluation):
    """Zero-shot classification accuracy on a labelled image set.

    Each image gets the class whose prompts' mean text embedding is closest. Logs
    ``zeroshot/<name>/top{k}`` for each k of ``topk`` and ``zeroshot/<name>/mean_per_class_recall``.

    Args:
        name: the set's name in the metric names; each callback of a run needs its own.
        root: a directory or HF hub data set id in the CLIP_benchmark layout (``classnames.txt``,
            optional ``zeroshot_classification_templates.txt``, ``<split>/0.tar ..`` of images and
            ``.cls`` labels), e.g. ``clip-benchmark/wds_vtab-cifar10``; with ``hf_dataset``, a
            ``load_dataset`` path instead.
        split: the split to evaluate (a sub-directory of ``root`` in the CLIP_benchmark layout).
        batch_size: images per forward pass on each device.
        num_workers: DataLoader processes decoding images on each device (0: in the training process).
        max_samples: evaluate only the first this many samples of the set (for quick checks).
        every_n_steps: during fit, evaluate after every this many optimizer steps; None: at the end of
            every validation epoch. ``validate`` and ``test`` evaluate once, at the end of their epoch.
        topk: the k of each top-k accuracy reported (k beyond the number of classes counts all).
        templates: prompts with ``{c}`` for the class name; None: the set's templates file, or a
            generic ensemble (``zeroshot.DEFAULT_TEMPLATES``) when it has none.
        hf_dataset: read ``root`` with ``datasets.load_dataset`` (any HF data set with a ``ClassLabel``
            column, whose names become the classes) instead of the CLIP_benchmark layout.
        image_column: HF data set only: the image column; None: the first ``Image`` feature.
        label_column: HF data set only: the ``ClassLabel`` column.
        dataset_kwargs: HF data set only: more ``load_dataset`` arguments, e.g. ``{name: plain_text}``.
    """

    prefix = "zeroshot"
    _dummy_target = 0

    def __init__(
        self,
        name: str,
        root: str,
        split: str = "test",
        batch_size: int = 64,
        num_workers: int = 2,
        max_samples: int | None = None,
        every_n_steps: int | None = None,
        topk: tuple[int, ...] = (1, 5),
        templates: list[str] | None = None,
        hf_dataset: bool = False,
        image_column: str | None = None,
        label_column: str = "label",
        dataset_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(name, split, batch_size, num_workers, max_samples, every_n_steps, topk)
        if templates is not None and not all("{c}" in t for t in templates):
            raise ValueError(f"ZeroShotClassification({name!r}): every template needs {{c}}, got {templates}")
        self.root, self.templates = root, templates
        if hf_dataset:
            self._load = partial(
                load_hf_classification_set,
                root,
                split,
                image_column=image_column,
                label_column=label_column,
                max_samples=max_samples,
                **(dataset_kwargs or {}),
            )
        else:
            self._load = partial(load_classification_set, root, split, max_samples=max_samples)
        self.classnames: list[str] = []
        self.prompts: list[str] = []  # the templates in use

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # read the class list now: a broken set fails the run at its start, not at the first evaluation
        evalset = self._load(rank=trainer.global_rank, world_size=trainer.world_size)
        self.classnames = evalset.classnames
        self.prompts = self.templates or evalset.templates or DEFAULT_TEMPLATES

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        # once per evaluation; every rank encodes every prompt, so the forward passes stay in step
        classifier = build_classifier(partial(encode_texts, pl_module), self.classnames, self.prompts)
        index, features, labels = [], [], []
        for idx, pixels, targets in self._batches(trainer, pl_module):
            index.append(idx)
            features.append(encode_images(trainer, pl_module, pixels))
            labels.append(torch.tensor(targets, dtype=torch.long))
        rows = gather_rows(pl_module, torch.cat(index), torch.cat(features), torch.cat(labels))
        return gathered_classification_metrics(*rows, classifier, self.topk)


class ZeroShotRetrieval(SetEvaluation):
    """Image-text retrieval recall on a captioned image set.

    Logs ``retrieval/<name>/i2t_R@K`` (any of an image's captions among the K texts closest to it)
    and ``retrieval/<name>/t2i_R@K`` (a caption's image among the K images closest to it).

    Args:
        name: the set's name in the metric names; each callback of a run needs its own.
        root: a directory or HF hub data set id in the CLIP_benchmark layout (``<split>/0.tar ..`` of
            images and ``.txt`` files with one caption per line), e.g. ``clip-benchmark/wds_flickr30k``.
        split: the split to evaluate (a sub-directory of ``root``).
        batch_size: images per forward pass on each device (their captions go in one text batch).
        num_workers: DataLoader processes decoding images on each device (0: in the training process).
        max_samples: evaluate only the first this many images of the set (for quick checks).
        every_n_steps: during fit, evaluate after every this many optimizer steps; None: at the end of
            every validation epoch. ``validate`` and ``test`` evaluate once, at the end of their epoch.
        topk: the K of each recall@K reported.
    """

    prefix = "retrieval"
    _dummy_target = [""]

    def __init__(
        self,
        name: str,
        root: str,
        split: str = "test",
        batch_size: int = 64,
        num_workers: int = 2,
        max_samples: int | None = None,
        every_n_steps: int | None = None,
        topk: tuple[int, ...] = (1, 5, 10),
    ):
        super().__init__(name, split, batch_size, num_workers, max_samples, every_n_steps, topk)
        self.root = root
        self._load = partial(load_retrieval_set, root, split, max_samples=max_samples)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._load(rank=trainer.global_rank, world_size=trainer.world_size)  # fail now on a missing set

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        image_index, image_features, text_index, text_features = [], [], [], []
        for idx, pixels, captions in self._batches(trainer, pl_module):
            image_index.append(idx)
            image_features.append(encode_images(trainer, pl_module, pixels))
            # all captions of the batch's images in one forward pass, so every rank runs one per step
            text_features.append(encode_texts(pl_module, [c for caps in captions for c in caps]))
            # (global index of the caption's image, caption number): one row per caption
            text_index += [
                (i, j) for i, caps in zip(idx.tolist(), captions, strict=True) for j in range(len(caps))
            ]
        images = gather_rows(pl_module, torch.cat(image_index), torch.cat(image_features))
        texts = gather_rows(pl_module, torch.tensor(text_index), torch.cat(text_features))
        return gathered_retrieval_metrics(*images, *texts, self.topk)
