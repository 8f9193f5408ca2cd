"""One FSDP2 training step on two CPU processes, then a sharded (distributed) checkpoint.

Run as a script (Lightning's launcher re-runs it for the second rank):
    python tests/fsdp2_checkpoint.py TOKENIZER_DIR CKPT_DIR
Writes the checkpoint directory CKPT_DIR and, next to it, ``full.pt``: every state entry gathered
into a full tensor, the reference an export of CKPT_DIR must reproduce.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from conftest import MICRO, quiet_trainer
from superclip_pl.train.module import LitSuperCLIP


def main(tokenizer_dir: str, ckpt_dir: str) -> None:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    enc = tokenizer(
        ["a red circle", "a blue square"], padding="max_length", max_length=8, return_tensors="pt"
    )
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), **enc}  # the same on both ranks: fine here
    trainer = quiet_trainer(
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1,
    )
    trainer.fit(module, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(ckpt_dir)
    # full_tensor() is a collective: every rank gathers, rank 0 writes
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    if trainer.is_global_zero:
        torch.save(full, Path(ckpt_dir).parent / "full.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
