"""``classification_loss`` (sparse targets) against the dense formulation: peak memory and time.

Dense reference: scatter the IDF weights of each caption's tokens into a (B, V) target, zero the
special tokens, normalise the rows, ``-(target * log_softmax(z)).sum(1).mean()``. Both run forward +
backward on the same fp32 logits (B, V); the sanity check asserts they give the same loss.

Peak memory, on the CPU: torch's CPU allocator calls malloc/free directly (no caching), so the
process's resident set follows the live tensors, provided freed memory really goes back to the
kernel. The measurement therefore runs in a fresh process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (every block over 64 KiB gets its own mmap and is unmapped on
free; without it glibc raises the threshold as it goes and keeps freed heap memory). After a
warm-up call of each variant and allocating the inputs, before each forward + backward the process
resets its resident high-water mark (``/proc/self/clear_refs`` = 5, Linux); peak = VmHWM - VmRSS
at the reset, i.e. everything the loss allocates on top of its inputs, the gradient of the logits
included. Variants alternate, 3 measurements each, median. (Cross-checked once against the
allocation events of ``torch.profiler`` with ``profile_memory=True``: same peaks within 0.5%.)
Time: the two variants alternate in one process (``timing.interleaved``), median of the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
from timing import interleaved, median_ratio
from workloads import CLIP_VOCAB, CONTEXT, random_captions, special_ids

from superclip_pl.losses import classification_loss

TARGETS = {"peak_memory_ratio": ("<=", 0.5), "time_ratio": ("<=", 1.0)}

FULL = dict(batch=512, vocab_size=CLIP_VOCAB, length=CONTEXT, rounds=15)
QUICK = dict(batch=32, vocab_size=4096, length=CONTEXT, rounds=3)


def dense_loss(logits: torch.Tensor, input_ids: torch.Tensor, idf: torch.Tensor, ignore_ids: list[int]):
    """The textbook form: a dense (B, V) soft target (a repeated token is written twice, same value)."""
    target = torch.zeros_like(logits).scatter_(1, input_ids, idf[input_ids])  # (B, V)
    target[:, ignore_ids] = 0
    target = target / target.sum(dim=1, keepdim=True)
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


VARIANTS = {"sparse": classification_loss, "dense": dense_loss}


def inputs(batch: int, vocab_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab_size, generator=g).requires_grad_()
    ids, _ = random_captions(batch, vocab_size, length, g)
    idf = torch.rand(vocab_size, generator=g) * 10  # IDF weights are positive, up to log(N)
    return logits, ids, idf


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_bytes_in_this_process(batch: int, vocab_size: int, length: int) -> dict[str, float]:
    """Run in a fresh process (see the module docstring): bytes each variant's forward + backward add."""
    ignore = special_ids(vocab_size)
    small = inputs(4, vocab_size, length)  # warm-up: load kernels, start the thread pool
    for loss_fn in VARIANTS.values():
        loss_fn(*small, ignore).backward()
    logits, ids, idf = inputs(batch, vocab_size, length)
    peaks: dict[str, list[int]] = {name: [] for name in VARIANTS}
    for _ in range(3):
        for name, loss_fn in VARIANTS.items():
            logits.grad = None
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current VmRSS
            base = _status_kib("VmRSS")
            loss_fn(logits, ids, idf, ignore).backward()
            peaks[name].append(_status_kib("VmHWM") - base)
    return {name: statistics.median(kib) * 1024 for name, kib in peaks.items()}


def peak_bytes(batch: int, vocab_size: int, length: int) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, __file__, "--peak", str(batch), str(vocab_size), str(length)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    batch, vocab, length = cfg["batch"], cfg["vocab_size"], cfg["length"]
    logits, ids, idf = inputs(batch, vocab, length)
    ignore = special_ids(vocab)

    # sanity: the two formulations compute the same loss and the same gradient
    values, grads = [], []
    for fn in VARIANTS.values():
        logits.grad = None
        loss = fn(logits, ids, idf, ignore)
        loss.backward()
        values.append(loss.item())
        grads.append(logits.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)

    def timed(fn):
        def call() -> None:
            logits.grad = None
            fn(logits, ids, idf, ignore).backward()

        return call

    times = interleaved({n: timed(fn) for n, fn in VARIANTS.items()}, rounds=cfg["rounds"])
    peaks = peak_bytes(batch, vocab, length)
    logits_bytes = logits.numel() * logits.element_size()
    return {
        "peak_memory_ratio": peaks["sparse"] / peaks["dense"],
        "time_ratio": median_ratio(times, "sparse", "dense"),
        "sparse_peak_mib": peaks["sparse"] / 2**20,
        "dense_peak_mib": peaks["dense"] / 2**20,
        # peak in units of one (B, V) fp32 tensor: the logits' own size
        "sparse_peak_in_logits": peaks["sparse"] / logits_bytes,
        "dense_peak_in_logits": peaks["dense"] / logits_bytes,
        "sparse_ms": statistics.median(times["sparse"]) * 1e3,
        "dense_ms": statistics.median(times["dense"]) * 1e3,
        "loss": values[0],
        "config": cfg,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--peak"]:  # the fresh process of ``peak_bytes``
    print(json.dumps(_peak_bytes_in_this_process(*map(int, sys.argv[2:]))))
