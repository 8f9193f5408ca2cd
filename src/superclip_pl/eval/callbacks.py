"""Zero-shot classification and image-text retrieval as Lightning callbacks.

When they run, how they log and the table they print: ``evaluation.SetEvaluation``. Each rank
evaluates its own shard of the set (``loop.py``); the numbers are those of the whole set, the same on
every rank: ``zeroshot/<name>/top1`` ... and ``retrieval/<name>/i2t_R@1`` ...
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from superclip_pl.eval.evaluation import SetEvaluation
from superclip_pl.eval.hfsets import load_hf_classification_set
from superclip_pl.eval.loop import encode_images, encode_texts, gather_rows
from superclip_pl.eval.metrics import (
    DEFAULT_TEMPLATES,
    build_classifier,
    gathered_classification_metrics,
    gathered_retrieval_metrics,
)
from superclip_pl.eval.sets import load_classification_set, load_retrieval_set


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
        main_metric: the metric ``results.md`` reports for the set: ``top1`` (``top{k}``) or
            ``mean_per_class_recall`` (DataComp's for Caltech-101, FGVC Aircraft, Flowers, Pets).
    """

    prefix = "zeroshot"
    task = "zero-shot classification"
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
        main_metric: str = "top1",
    ):
        super().__init__(name, split, batch_size, num_workers, max_samples, every_n_steps, topk, main_metric)
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
        main_metric: the metric ``results.md`` reports for the set: ``mean_R@1`` (the mean of
            ``i2t_R@1`` and ``t2i_R@1``, DataComp's retrieval score), or ``i2t_R@K`` / ``t2i_R@K``.
    """

    prefix = "retrieval"
    task = "retrieval"
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
        main_metric: str = "mean_R@1",
    ):
        super().__init__(name, split, batch_size, num_workers, max_samples, every_n_steps, topk, main_metric)
        self.root = root
        self._load = partial(load_retrieval_set, root, split, max_samples=max_samples)

    def metric_names(self) -> list[str]:
        return [f"{d}_R@{k}" for d in ("i2t", "t2i", "mean") for k in self.topk]

    def main_result(self) -> float | None:
        if not self.main_metric.startswith("mean_"):
            return super().main_result()
        both = [self.results.get(f"retrieval/{self.name}/{d}_{self.main_metric[5:]}") for d in ("i2t", "t2i")]
        return None if None in both else sum(both) / 2

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
