"""A callback the long-run tests add to `superclip fit` configs: for every training batch, one JSON line
with the optimizer step, the batch's sample keys and one draw from each global RNG (Python, NumPy,
torch), in a file per rank; the tests compare runs that were stopped and resumed with one that was not."""

import json
import random

import numpy as np
import torch
from lightning.pytorch import Callback


class KeysLog(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        draws = [random.random(), float(np.random.rand()), torch.rand(()).item()]
        line = {"step": trainer.global_step, "keys": batch["keys"], "rng": draws}
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            f.write(json.dumps(line) + "\n")


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]
