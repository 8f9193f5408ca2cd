"""Train a few steps under 2-process DDP on CPU, recording the sample keys each rank trained on.

Run as a script (Lightning's DDP launcher re-runs it for every rank):
    python tests/distributed_data.py DATA_FILES TOKENIZER_DIR OUT_DIR MAX_STEPS [CKPT_PATH]
DATA_FILES "a.tar-glob,b.tar-glob" trains on the mixture of the two, named a and b, weighted 0.7 / 0.3.
Writes OUT_DIR/rank{r}.json: {"keys": [...], "skipped": {...}, "seen": n, "totals": [seen, {...}],
"sources": {name: samples read}};
checkpoints go to OUT_DIR/checkpoints every 4 steps.
"""

import json
import os
import sys

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from superclip_pl.data import DataSource, ImageTextDataModule


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["pixel_values"].mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Record(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.keys = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += batch["keys"]

    def on_train_end(self, trainer, pl_module):
        dm = trainer.datamodule
        record = {
            "keys": self.keys,
            "skipped": dict(dm.skips.skipped["train"]),
            "seen": dm.skips.seen["train"],
            "totals": dm.skips.train_totals,
            "sources": dm.source_counts.read,
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


def main(data_files: str, tokenizer_dir: str, out_dir: str, max_steps: int, ckpt_path: str | None) -> None:
    patterns = data_files.split(",")
    train = [
        DataSource(path="webdataset", data_files=p, name=name, weight=w)
        for p, name, w in zip(patterns, "ab", (0.7, 0.3), strict=False)
    ]
    dm = ImageTextDataModule(
        tokenizer=tokenizer_dir,
        train=train[0] if len(train) == 1 else train,
        batch_size=3,
        num_workers=1,
        image_size=16,
        max_length=16,
        shuffle_buffer=5,
        max_skip_fraction=1.0,
        max_image_pixels=4096,
    )
    checkpoints = os.path.join(out_dir, "checkpoints")
    trainer = quiet_trainer(
        enable_checkpointing=True,
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        log_every_n_steps=2,
        callbacks=[
            Record(out_dir),
            ModelCheckpoint(checkpoints, every_n_train_steps=4, save_top_k=-1),
        ],
    )
    trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
