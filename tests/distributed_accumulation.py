"""One optimizer step over 16 image-caption pairs, split into micro-batches and ranks in various ways;
writes the logged loss and the gradients per rank.

Run as a script (Lightning's DDP launcher re-runs it for every rank):
    python tests/distributed_accumulation.py TOKENIZER_DIR OUT_DIR MODE LOSS [NEGATIVES [OPTIONS]]
MODE: ``whole`` (one process, one batch of 16), ``micro`` (one process, 4 micro-batches of 4),
``uneven`` (one process, micro-batches of 5, 3, 6, 2), ``ddp`` / ``fsdp2`` (2 processes x 4
micro-batches of 2), ``ddp_whole`` (2 processes x one batch of 8); ``throughput``: 6 steps on 2
processes with Lightning's ThroughputMonitor, logged to OUT_DIR/metrics.csv. LOSS: contrastive or
siglip. NEGATIVES: 1 (default) or 0 (``accumulated_negatives=False``). OPTIONS: ``checkpointing``
(gradient checkpointing), ``bf16`` (bf16-mixed precision), ``locked`` (locked towers) and / or
``patch_dropout`` (0.5, with the kept patches of every encoding saved as ``draws``), comma-separated.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

import superclip_pl.patch_dropout as patch_dropout
from superclip_pl.train.module import LitSuperCLIP

sys.path.insert(0, os.path.dirname(__file__))
from conftest import MICRO, quiet_trainer  # noqa: E402
from distributed_step import SaveGradients  # noqa: E402

SIZES = {
    "whole": [16],
    "micro": [4, 4, 4, 4],
    "uneven": [5, 3, 6, 2],
    "ddp": [2] * 4,
    "fsdp2": [2] * 4,
    "ddp_whole": [8],
}
# OPTIONS `locked`: LiT-style, the image tower but its projection and last block, the text tower but
# its projection
LOCKED = dict(lock_image=True, lock_image_unlocked_layers=2, lock_text=True, lock_text_unlocked_layers=1)
REDUCTIONS = []  # the gradient buckets DDP all-reduced (one entry per bucket and reduction)
DRAWS: list[torch.Tensor] = []  # the kept patches (B, n) of every masked encoding, in order


def recording(draw):
    """``patch_dropout.draw_kept`` that also appends what it draws to ``DRAWS``."""

    def recorded(*args, **kwargs):
        kept = draw(*args, **kwargs)
        DRAWS.append(kept.clone())
        return kept

    return recorded


def counting_allreduce(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    REDUCTIONS.append(bucket.index())
    return allreduce_hook(state, bucket)


class SaveReductions(SaveGradients):
    def on_fit_start(self, trainer, pl_module):
        if isinstance(
            trainer.strategy.model, DistributedDataParallel
        ):  # Lightning registers hooks on GPUs only
            trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt")
        torch.save({**torch.load(path), "reductions": len(REDUCTIONS), "draws": list(DRAWS)}, path)


def pairs(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "circle", "square", "star", "left", "big", "small", "photo"]
    caps = [" ".join(words[(i * 3 + j * 7) % 10] for j in range(1 + i % 5)) for i in range(16)]
    enc = tokenizer(caps, padding="max_length", max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(16, 3, 16, 16, generator=g), **enc}


class MicroBatches(IterableDataset):
    """This rank's micro-batches: consecutive slices of its contiguous share of the 16 pairs."""

    def __init__(self, batch, sizes, repeat: int = 1):
        self.batch, self.sizes, self.repeat = batch, sizes, repeat

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for _ in range(self.repeat):
            start = rank * (16 // world)
            for n in self.sizes:
                yield {k: v[start : start + n] for k, v in self.batch.items()}
                start += n


def throughput(tokenizer_dir: str, out_dir: str) -> None:
    """2 ranks x 6 steps at 2 x 4 pairs, ThroughputMonitor logging every step to ``out_dir``."""
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from superclip_pl.train.module import batch_size

    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    monitor = ThroughputMonitor(batch_size_fn=batch_size, window_size=2)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=6,
        callbacks=[monitor],
        logger=CSVLogger(out_dir, name="", version=""),
        log_every_n_steps=1,
    )
    loader = DataLoader(MicroBatches(pairs(module.tokenizer), [4, 4], repeat=3), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


def main(
    tokenizer_dir: str, out_dir: str, mode: str, loss: str, negatives: bool = True, options: str = ""
) -> None:
    if mode == "throughput":
        return throughput(tokenizer_dir, out_dir)
    torch.manual_seed(0)
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone_config=MICRO,
        loss=loss,
        warmup_steps=0,
        accumulated_negatives=negatives,
        gradient_checkpointing="checkpointing" in options,
        **(LOCKED if "locked" in options else {}),
        patch_dropout=0.5 if "patch_dropout" in options else 0.0,
    )
    strategy = "auto"
    if mode.startswith("ddp"):  # with the settings of the shipped DDP fragment
        from lightning.pytorch.strategies import DDPStrategy

        fragment = Path(__file__).resolve().parent.parent / "configs" / "trainer" / "ddp.yaml"
        strategy = DDPStrategy(**yaml.safe_load(fragment.read_text())["trainer"]["strategy"]["init_args"])
    elif mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = quiet_trainer(
        devices=2 if mode in ("ddp", "fsdp2", "ddp_whole") else 1,
        strategy=strategy,
        max_steps=1,
        accumulate_grad_batches=len(SIZES[mode]),
        callbacks=[SaveReductions(out_dir)],
        precision="bf16-mixed" if "bf16" in options else "32-true",
    )
    loader = DataLoader(MicroBatches(pairs(module.tokenizer), SIZES[mode]), batch_size=None)
    draw, DRAWS[:] = patch_dropout.draw_kept, []
    patch_dropout.draw_kept = recording(draw)  # (this function may run inside the test process)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        patch_dropout.draw_kept = draw


if __name__ == "__main__":
    main(*sys.argv[1:5], len(sys.argv) < 6 or sys.argv[5] == "1", *sys.argv[6:])
