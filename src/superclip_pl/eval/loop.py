"""The distributed mechanics of evaluating a model on a set inside a Lightning run.

Every rank reads a disjoint shard of the set and runs the same number of forward passes (dummy
batches once its shard is used up), because under FSDP each forward is itself a collective: a rank
that stopped early, or an evaluation on rank 0 alone, would deadlock the others. Results are then
all-gathered, padded to the longest rank with index -1 (``zeroshot.unique_rows`` drops those rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from superclip_pl.eval.metrics import pad_rows
from superclip_pl.eval.sets import ClassificationSample
from superclip_pl.tokenizer import tokenize
from superclip_pl.transforms import eval_transform

T = TypeVar("T")

# (global sample indices (B,), pixels (B, 3, H, W), per sample a label or a list of captions)
Batch = tuple[Tensor, Tensor, list[Any]]


class _Shard(IterableDataset):
    """This rank's samples as (index, pixels, label or captions), decoded and transformed.

    ``load(rank=, world_size=)`` returns an iterable evaluation set (``evalsets``). With DataLoader
    workers, worker w of rank r reads as rank r * W + w of world_size * W: the parts stay disjoint,
    cover the set, and each worker decodes only its own samples.
    """

    def __init__(self, load: Callable[..., Iterable], rank: int, world_size: int, transform: Callable):
        self.load, self.rank, self.world_size, self.transform = load, rank, world_size, transform

    def __iter__(self) -> Iterator[tuple[int, Tensor, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for s in self.load(rank=self.rank * workers + worker, world_size=self.world_size * workers):
            target = s.label if isinstance(s, ClassificationSample) else s.captions
            yield s.index, self.transform(s.image), target


def _collate(samples: Sequence[tuple[int, Tensor, Any]]) -> Batch:
    index, pixels, targets = zip(*samples, strict=True)
    return torch.tensor(index, dtype=torch.long), torch.stack(pixels), list(targets)


def shard_loader(
    load: Callable[..., Iterable],
    rank: int,
    world_size: int,
    transform: Callable,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """Batches of this rank's shard; ``load`` must be picklable when ``num_workers`` > 0."""
    return DataLoader(
        _Shard(load, rank, world_size, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )


def lockstep(batches: Iterable[T], strategy: Strategy) -> Iterator[T | None]:
    """This rank's batches, then ``None`` until every rank has run out: all ranks take the same
    number of steps, so the forward passes (collectives under FSDP) line up. One all-reduce a step."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not strategy.reduce_boolean_decision(batch is not None, all=False):
            return
        yield batch


def shard_batches(
    load: Callable[..., Iterable],
    trainer: Trainer,
    image_size: int,
    batch_size: int,
    num_workers: int,
    dummy_target: Any,
    what: str = "the set",
) -> Iterator[Batch]:
    """This rank's batches of the set, then placeholder batches (one black image, index -1, target
    ``dummy_target``) until every rank is done. Raises on every rank when no rank had a sample."""
    dummy = (torch.tensor([-1]), torch.zeros(1, 3, image_size, image_size), [dummy_target])
    loader = shard_loader(
        load, trainer.global_rank, trainer.world_size, eval_transform(image_size), batch_size, num_workers
    )
    steps = 0
    for batch in lockstep(loader, trainer.strategy):
        steps += 1
        yield dummy if batch is None else batch
    if steps == 0:
        raise ValueError(f"{what}: no readable samples")


def gather_rows(pl_module: LightningModule, *tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows from every rank, concatenated: (sum over ranks of the padded N, ...).

    Ranks may hold different numbers of rows; each pads with -1 to the longest first (an all-gather
    needs equal shapes). All tensors must have the same number of rows on a rank.
    """
    device = pl_module.device
    n = int(pl_module.all_gather(torch.tensor(len(tensors[0]), device=device)).max())
    out = []
    for t in tensors:
        gathered = pl_module.all_gather(pad_rows(t.to(device), n))  # (R, n, ...); (n, ...) on 1 process
        out.append(gathered.reshape(-1, *t.shape[1:]))
    return out


@contextmanager
def inference(trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
    """Eval mode, no autograd and the run's precision (autocast for bf16-mixed) for a forward pass
    outside Lightning's own loops; each submodule's train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in pl_module.modules()]
    pl_module.eval()
    try:
        # no_grad, not inference_mode: tensors made here (e.g. FSDP's un-sharded parameters) may be
        # used by training afterwards, which inference tensors cannot be
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        for m, training in modes:
            m.training = training


def encode_images(trainer: Trainer, pl_module: LightningModule, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings (B, D) in fp32, inputs cast as the run's precision wants them."""
    pixels = trainer.precision_plugin.convert_input(pixels.to(pl_module.device))  # bf16-true: bf16 inputs
    return pl_module.model.encode_image(pixels).float()


def encode_texts(pl_module: LightningModule, texts: list[str]) -> torch.Tensor:
    """Normalised text embeddings (N, D) in fp32 of ``texts``, tokenised as in training."""
    tokens = tokenize(pl_module.tokenizer, texts, pl_module.max_length)
    return pl_module.model.encode_text(**{k: v.to(pl_module.device) for k, v in tokens.items()}).float()
