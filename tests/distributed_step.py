"""One SuperCLIP training step under a given strategy; writes loss, gradients and counts per rank.

Run as a script (Lightning's DDP launcher re-runs it for every rank):
    python tests/distributed_step.py TOKENIZER_DIR OUT_DIR {single,ddp,fsdp2} CLASS_LOSS_WEIGHT
``single`` runs one process on the whole batch; ``ddp`` / ``fsdp2`` run two processes on its halves.
"""

import os
import sys

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, IterableDataset

from superclip_pl.train.module import LitSuperCLIP

sys.path.insert(0, os.path.dirname(__file__))
from conftest import MICRO, quiet_trainer  # noqa: E402


def global_batch(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "circle", "square", "star", "left", "big"]
    caps = [" ".join(words[(i * 3 + j) % 8] for j in range(2 + i % 4)) for i in range(8)]
    enc = tokenizer(caps, padding="max_length", max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(8, 3, 16, 16, generator=g), **enc}


class RankSlice(IterableDataset):
    """Yields this rank's contiguous slice of the global batch (the whole batch on one process)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        n = 8 // world
        yield {k: v[rank * n : (rank + 1) * n] for k, v in self.batch.items()}


class SaveGradients(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {}
        for name, p in pl_module.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):  # FSDP2: sharded DTensor
                g = g.full_tensor()
            grads[name] = None if g is None else g.detach().clone()
        state = {
            "grads": grads,
            "loss": trainer.callback_metrics["train/loss"].item(),
            "df": pl_module.doc_freq.df.clone() if pl_module.doc_freq is not None else None,
            "num_docs": int(pl_module.doc_freq.num_docs) if pl_module.doc_freq is not None else None,
        }
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def main(tokenizer_dir: str, out_dir: str, mode: str, weight: float) -> None:
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, class_loss_weight=weight, warmup_steps=0)
    strategy = {"single": "auto", "ddp": "ddp", "fsdp2": "model_parallel_fsdp2"}[mode]
    if strategy == "model_parallel_fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = quiet_trainer(
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_steps=1,
        callbacks=[SaveGradients(out_dir)],
    )
    loader = DataLoader(RankSlice(global_batch(module.tokenizer)), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
