"""Negatives across accumulation: step time against Lightning's plain accumulation, and peak activation
memory against one batch of the full size.

Three runs of ``LitSuperCLIP`` under a ``Trainer`` on the same batches, from the same weights:
``negatives`` (``accumulate_grad_batches=K`` at micro-batch B, ``accumulated_negatives=True``: one
contrastive loss over K x B, gradient caching), ``plain`` (the same, ``accumulated_negatives=False``:
a loss per micro-batch) and ``full`` (one batch of K x B, no accumulation). Time per optimizer step:
the median interval between steps after the warm-up, the two accumulating runs interleaved
(``timing.interleaved``), the ratio the median over rounds. Memory: the peak of the bytes autograd
holds for the backward pass (saved activations; parameters left out, each storage counted once),
measured with ``torch.autograd.graph.saved_tensors_hooks`` in separate runs, since the hooks cost time.
This is the memory that grows with the batch; on a GPU ``torch.cuda.max_memory_allocated`` would add
the parameters, gradients and optimizer state, the same in all three runs.
Expected: each micro-batch is encoded twice, so about 4/3 of plain accumulation's compute (forward
1, backward 2), and the activations of one micro-batch, about 1/K of the full batch's.
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
from workloads import CLIP_VOCAB, Batches, random_batch, word_tokenizer

from superclip_pl.train.module import LitSuperCLIP

SHAPES = {
    # the demo's scale and the paper's B/16 (224 px, 77 tokens, the CLIP vocabulary)
    "tiny": dict(
        backbone="tiny", backbone_config=None, vocab=512, image=64, length=24, warmup=2, steps=6, rounds=3
    ),
    "b16": dict(
        backbone="ViT-B-16",
        backbone_config=None,
        vocab=CLIP_VOCAB,
        image=224,
        length=77,
        warmup=1,
        steps=2,
        rounds=1,
    ),
}
QUICK_SHAPE = dict(
    backbone="tiny",
    backbone_config={"vision_config": {"num_hidden_layers": 1}, "text_config": {"num_hidden_layers": 1}},
    vocab=128,
    image=16,
    length=12,
    warmup=1,
    steps=2,
    rounds=1,
)
MICRO, K = 4, 4
TARGETS = {
    **{f"{s}_time_ratio": ("<=", 1.4) for s in SHAPES},
    **{f"{s}_memory_ratio": ("<=", 0.4) for s in SHAPES},
    **{f"{s}_{v}_s_per_step": None for s in SHAPES for v in ("negatives", "plain")},
}


class StepClock(Callback):
    """perf_counter after every optimizer step (the last micro-batch of each)."""

    def __init__(self, k: int):
        self.k, self.ends = k, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.k == 0:
            self.ends.append(time.perf_counter())


class SavedBytes:
    """Peak bytes of the tensors autograd saves for backward, parameters excluded, each storage once."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, int] = {}  # storage -> tensors holding it
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        return t if ptr in self.skip else _Held(self, t, ptr)

    @staticmethod
    def unpack(held):
        return held if isinstance(held, torch.Tensor) else held.tensor


class _Held:
    def __init__(self, meter: SavedBytes, tensor: torch.Tensor, ptr: int):
        self.meter, self.tensor, self.ptr = meter, tensor, ptr
        self.nbytes = tensor.untyped_storage().nbytes()
        meter.live[ptr] = meter.live.get(ptr, 0) + 1
        if meter.live[ptr] == 1:
            meter.now += self.nbytes
            meter.peak = max(meter.peak, meter.now)

    def __del__(self):
        self.meter.live[self.ptr] -= 1
        if self.meter.live[self.ptr] == 0:
            del self.meter.live[self.ptr]
            self.meter.now -= self.nbytes


def fit(tokenizer_dir, shape, init, batches, k, negatives, callbacks=()) -> LitSuperCLIP:
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone=shape["backbone"],
        backbone_config=shape["backbone_config"],
        image_size=shape["image"],
        max_length=shape["length"],
        warmup_steps=10,
        accumulated_negatives=negatives,
    )
    module.load_state_dict(init)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches) // k,
        accumulate_grad_batches=k,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, DataLoader(Batches(batches), batch_size=None))
    return module


def peak_saved_bytes(tokenizer_dir, shape, init, batches, k, negatives) -> int:
    """Peak saved-activation bytes over the run (one optimizer step)."""
    meter = SavedBytes([])

    class Parameters(Callback):  # the module's parameters exist once the Trainer has it
        def on_train_start(self, trainer, pl_module):
            meter.skip = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}

    with torch.autograd.graph.saved_tensors_hooks(meter.pack, SavedBytes.unpack):
        fit(tokenizer_dir, shape, init, batches, k, negatives, [Parameters()])
    return meter.peak


def measure(name: str, shape: dict) -> dict:
    steps = shape["warmup"] + shape["steps"]
    micro = [
        random_batch(MICRO, shape["image"], shape["vocab"], shape["length"], seed=i) for i in range(K * steps)
    ]
    full = [
        {key: torch.cat([b[key] for b in micro[i : i + K]]) for key in micro[0]}
        for i in range(0, len(micro), K)
    ]
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        word_tokenizer(shape["vocab"], tokenizer_dir)
        torch.manual_seed(0)
        init = copy.deepcopy(
            LitSuperCLIP(
                tokenizer_dir,
                backbone=shape["backbone"],
                backbone_config=shape["backbone_config"],
                image_size=shape["image"],
                max_length=shape["length"],
            ).state_dict()
        )

        def timed(negatives: bool):
            def one_run() -> float:
                clock = StepClock(K)
                fit(tokenizer_dir, shape, init, micro, K, negatives, [clock])
                ends = clock.ends[shape["warmup"] - 1 :]
                return statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))

            return one_run

        times = interleaved(
            {"negatives": timed(True), "plain": timed(False)}, rounds=shape["rounds"], warmup=0
        )
        peaks = {  # one optimizer step each
            "negatives": peak_saved_bytes(tokenizer_dir, shape, init, micro[:K], K, True),
            "plain": peak_saved_bytes(tokenizer_dir, shape, init, micro[:K], K, False),
            "full": peak_saved_bytes(tokenizer_dir, shape, init, full[:1], 1, True),
        }
    return {
        f"{name}_time_ratio": median_ratio(times, "negatives", "plain"),
        f"{name}_memory_ratio": peaks["negatives"] / peaks["full"],
        f"{name}_negatives_s_per_step": statistics.median(times["negatives"]),
        f"{name}_plain_s_per_step": statistics.median(times["plain"]),
        f"{name}_saved_mib": {k: v / 2**20 for k, v in peaks.items()},
        f"{name}_s_per_step": times,
    }


def run(quick: bool = False) -> dict:
    result = {"micro_batch": MICRO, "micro_batches": K}
    for name, shape in SHAPES.items():
        result |= measure(name, QUICK_SHAPE if quick else shape)
    return result
