"""What Lightning costs per step: ``LitSuperCLIP`` under a ``Trainer`` vs a plain PyTorch loop.

Both sides start from the same weights and run the same batches from the same ``DataLoader``, the
same losses (contrastive + IDF-counted classification), AdamW with the module's parameter groups
and its warm-up + cosine ``LambdaLR`` stepped every step. The Trainer has no logger, checkpointing,
progress bar or model summary, as a benchmark run would; what is left is Lightning's loop, hooks
and ``self.log`` bookkeeping. A run's time per step is the median of its step-to-step intervals
after the warm-up steps: other work on a shared machine comes in bursts that a mean would charge to
whichever run it hit (means swung the ratio between 0.99 and 1.09 on repeats), and with logging off
neither loop does periodic work that a median would hide. The two sides' runs alternate
(``timing.interleaved``); the ratio is the median over rounds.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer
from timing import interleaved, median_ratio
from torch.utils.data import DataLoader
from workloads import Batches, random_batch, step_loss, word_tokenizer

from superclip_pl.train.module import LitSuperCLIP, param_groups, warmup_cosine

TARGETS = {"step_time_ratio": ("<=", 1.05), "lightning_ms_per_step": None, "plain_ms_per_step": None}

# the demo's scale: tiny preset, 32 px, batch 16, a few hundred tokens, short captions
FULL = dict(
    backbone_config=None, vocab_size=512, image_size=32, batch=16, length=24, warmup=5, steps=30, rounds=8
)
QUICK = dict(
    backbone_config={"vision_config": {"num_hidden_layers": 1}, "text_config": {"num_hidden_layers": 1}},
    vocab_size=128,
    image_size=16,
    batch=4,
    length=12,
    warmup=2,
    steps=4,
    rounds=1,
)


class StepClock(Callback):
    """perf_counter at the end of every training step (after the optimizer and scheduler)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


def per_step(ends: list[float], warmup: int) -> float:
    """Median interval between the ends of consecutive steps, the warm-up steps left out."""
    return statistics.median(b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:], strict=False))


def make_module(tokenizer_dir: str, cfg: dict, state: dict | None) -> LitSuperCLIP:
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone="tiny",
        backbone_config=cfg["backbone_config"],
        image_size=cfg["image_size"],
        warmup_steps=10,
    )
    if state is not None:
        module.load_state_dict(state)
    return module


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    total = cfg["warmup"] + cfg["steps"]
    batches = [
        random_batch(cfg["batch"], cfg["image_size"], cfg["vocab_size"], cfg["length"], seed=i)
        for i in range(total)
    ]
    loader = DataLoader(Batches(batches), batch_size=None)

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        word_tokenizer(cfg["vocab_size"], tokenizer_dir)
        torch.manual_seed(0)
        init = copy.deepcopy(make_module(tokenizer_dir, cfg, None).state_dict())

        def lightning() -> float:
            module, clock = make_module(tokenizer_dir, cfg, init), StepClock()
            trainer = Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=total,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[clock],
            )
            trainer.fit(module, loader)
            return per_step(clock.ends, cfg["warmup"])

        def plain() -> float:
            module = make_module(tokenizer_dir, cfg, init)  # its model, counts and hyper-parameters
            hp, model, doc_freq = module.hparams, module.model, module.doc_freq
            model.train()
            opt = torch.optim.AdamW(
                param_groups(module, hp.weight_decay), lr=hp.lr, betas=hp.betas, eps=hp.eps
            )
            schedule = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
            )
            ends = []
            for batch in loader:
                loss = step_loss(model, batch, doc_freq, module.ignore_ids, hp.class_loss_weight)
                loss.backward()
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
                ends.append(time.perf_counter())
            return per_step(ends, cfg["warmup"])

        times = interleaved({"lightning": lightning, "plain": plain}, rounds=cfg["rounds"])
    return {
        "step_time_ratio": median_ratio(times, "lightning", "plain"),
        "lightning_ms_per_step": 1e3 * statistics.median(times["lightning"]),
        "plain_ms_per_step": 1e3 * statistics.median(times["plain"]),
        "lightning_s_per_step": times["lightning"],
        "plain_s_per_step": times["plain"],
        "config": cfg,
    }
