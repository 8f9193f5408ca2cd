"""Linear-probe accuracy on frozen image features as a Lightning callback (the protocol: ``probe.py``).

Each rank encodes its own shard of each split in lock-step (``loop.py``, as the zero-shot callbacks
do); the features are all-gathered, so every rank holds all of them, in the same order (by sample
index) whatever the world size. Every rank then trains the same probe on the same features (no rank
waits idle in a collective while another trains), and rank 0's metrics are broadcast, so the logged
numbers are equal everywhere. One extraction per evaluation serves the whole weight-decay search.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from superclip_pl.eval.evaluation import SetEvaluation
from superclip_pl.eval.loop import encode_images, gather_rows
from superclip_pl.eval.metrics import unique_rows
from superclip_pl.eval.probe import linear_probe, split_validation
from superclip_pl.eval.sets import load_classification_set


class LinearProbe(SetEvaluation):
    """Linear-probe classification accuracy: a linear classifier trained on the image features of a
    set's train split (the model frozen), scored on its test split, as CLIP_benchmark does it.

    Features are the normalised image embeddings (CLIP_benchmark's default, ``normalize=True``). Logs
    ``linprobe/<name>/top{k}`` for each k of ``topk`` and ``linprobe/<name>/mean_per_class_recall``.

    Args:
        name: the set's name in the metric names; each callback of a run needs its own.
        root: a directory or HF hub data set id in the CLIP_benchmark layout with a train and a test
            split (``classnames.txt``, ``<split>/0.tar ..`` of images and ``.cls`` labels), e.g.
            ``clip-benchmark/wds_vtab-cifar10``.
        split: the split the probe is scored on.
        train_split: the split the probe is trained on.
        val_split: a split to choose the weight decay on; None: ``val_proportion`` of ``train_split``.
        val_proportion: the part of ``train_split`` (seeded random) held out to choose the weight decay,
            when there is no ``val_split``; 0: no search, weight decay 0 (CLIP_benchmark without a
            validation set). The final probe trains on train + validation.
        fewshot_k: train on k samples per class of the train part only (seeded random); None: all.
        lr: the probe's peak learning rate (AdamW, cosine schedule; CLIP_benchmark's default 0.1).
        epochs: epochs of probe training (CLIP_benchmark's default 10).
        probe_batch_size: features per probe training step (CLIP_benchmark's default 64).
        seed: fixes the validation split, the few-shot choice, the probe's initialisation and batch
            order; the same seed gives the same probe.
        batch_size: images per forward pass on each device, when encoding.
        num_workers: DataLoader processes decoding images on each device (0: in the training process).
        max_samples: use only the first this many samples of each split (for quick checks).
        every_n_steps: during fit, evaluate after every this many optimizer steps; None: at the end of
            every validation epoch. ``validate`` and ``test`` evaluate once, at the end of their epoch.
        topk: the k of each top-k accuracy reported (k beyond the number of classes counts all).
        main_metric: the metric ``results.md`` reports for the set: ``top1`` (``top{k}``) or
            ``mean_per_class_recall``.
    """

    prefix = "linprobe"
    task = "linear probe"
    needs_text = False
    _dummy_target = 0

    def __init__(
        self,
        name: str,
        root: str,
        split: str = "test",
        train_split: str = "train",
        val_split: str | None = None,
        val_proportion: float = 0.1,
        fewshot_k: int | None = None,
        lr: float = 0.1,
        epochs: int = 10,
        probe_batch_size: int = 64,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 2,
        max_samples: int | None = None,
        every_n_steps: int | None = None,
        topk: tuple[int, ...] = (1, 5),
        main_metric: str = "top1",
    ):
        super().__init__(name, split, batch_size, num_workers, max_samples, every_n_steps, topk, main_metric)
        for arg, value, ok in (
            ("val_proportion", val_proportion, 0 <= val_proportion < 1),
            ("fewshot_k", fewshot_k, fewshot_k is None or fewshot_k >= 1),
            ("lr", lr, lr > 0),
            ("epochs", epochs, epochs >= 1),
            ("probe_batch_size", probe_batch_size, probe_batch_size >= 1),
        ):
            if not ok:
                raise ValueError(
                    f"LinearProbe({name!r}): {arg}={value} is out of range "
                    "(val_proportion in [0, 1), fewshot_k >= 1, lr > 0, epochs >= 1, probe_batch_size >= 1)"
                )
        self.root, self.train_split, self.val_split = root, train_split, val_split
        self.val_proportion, self.fewshot_k, self.seed = val_proportion, fewshot_k, seed
        self.lr, self.epochs, self.probe_batch_size = lr, epochs, probe_batch_size
        self._load = self._loader(split)
        self.num_classes = 0
        self.weight_decay: float | None = None  # chosen by the last evaluation's search

    def _loader(self, split: str) -> partial:
        return partial(load_classification_set, self.root, split, max_samples=self.max_samples)

    def _splits(self) -> list[str]:
        return [self.train_split, *([self.val_split] if self.val_split else []), self.split]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # open every split now: a missing one fails the run at its start, not at the first evaluation
        for split in self._splits():
            evalset = self._loader(split)(rank=trainer.global_rank, world_size=trainer.world_size)
        self.num_classes = len(evalset.classnames)

    def _features(self, trainer: Trainer, pl_module: LightningModule, split: str) -> tuple[Tensor, Tensor]:
        """Features (N, D) fp32 and labels (N,) of the whole split, on every rank, ordered by sample."""
        index, features, labels = [], [], []
        for idx, pixels, targets in self._batches(trainer, pl_module, self._loader(split), split):
            index.append(idx)
            features.append(encode_images(trainer, pl_module, pixels))
            labels.append(torch.tensor(targets, dtype=torch.long))
        rows = gather_rows(pl_module, torch.cat(index), torch.cat(features), torch.cat(labels))
        _, features, labels = unique_rows(*rows)
        return features, labels.to(features.device)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        train, *val, test = (self._features(trainer, pl_module, s) for s in self._splits())
        val = val[0] if val else None
        if val is None and self.val_proportion > 0:
            kept, held_out = split_validation(train[1], self.val_proportion, self.seed)
            train, val = (train[0][kept], train[1][kept]), (train[0][held_out], train[1][held_out])
        hyper = dict(lr=self.lr, epochs=self.epochs, batch_size=self.probe_batch_size, seed=self.seed)
        metrics, decay = linear_probe(
            train, test, self.num_classes, val, self.fewshot_k, topk=self.topk, **hyper
        )
        # identical on every rank given identical features; rank 0's make that exact
        metrics, self.weight_decay = trainer.strategy.broadcast((metrics, decay), src=0)
        return metrics
