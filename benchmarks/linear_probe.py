"""The linear probe's own time: CLIP_benchmark's protocol (``eval/probe.py``) on features in memory.

10,000 training features of width 512 and 100 classes (a tenth held out for the weight-decay search,
the final probe trained on all 10,000), 2,000 test features; CLIP_benchmark's defaults (lr 0.1,
10 epochs, batches of 64). The time covers the whole search and the final training, not feature
extraction (the model's forward passes, measured by ``eval_throughput``). The features are
normalised noisy class centres, so the probe has something to learn (its top-1 is reported too).
Median of ``rounds`` runs; the target is for 2 cores (``--threads 2``). ``probe_cpu_s`` is the
process's CPU time over the same run: on a machine shared with other work, the figure that wall time
would be on an idle one (with one thread).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from superclip_pl.eval import probe

TARGETS = {"probe_s": ("<", 30.0), "probe_cpu_s": None, "trainings": None, "passes": None, "top1": None}

FULL = dict(train=10_000, test=2_000, dim=512, classes=100, rounds=2)
QUICK = dict(train=400, test=100, dim=32, classes=10, rounds=1)


def features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return F.normalize(centres[y] + 6.0 * torch.randn(n, dim, generator=g), dim=-1), y


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    x, y = features(cfg["train"], cfg["dim"], cfg["classes"], seed=1)
    test = features(cfg["test"], cfg["dim"], cfg["classes"], seed=2)
    kept, held_out = probe.split_validation(y, 0.1, seed=0)
    trainings = []  # probes trained per call of train_probes
    real = probe.train_probes

    def counting(*args, **kwargs):
        trainings.append(len(args[3]))
        return real(*args, **kwargs)

    probe.train_probes = counting
    try:
        seconds, cpu = [], []
        for _ in range(cfg["rounds"]):
            trainings.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics, decay = probe.linear_probe(
                (x[kept], y[kept]), test, cfg["classes"], val=(x[held_out], y[held_out])
            )
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    finally:
        probe.train_probes = real
    return {
        "probe_s": statistics.median(seconds),
        "probe_cpu_s": statistics.median(cpu),
        "trainings": float(sum(trainings)),  # probes trained in all (search + final)
        "passes": float(len(trainings)),  # passes over the data (each trains a batch of probes)
        "top1": metrics["top1"],
        "weight_decay": decay,
        "seconds": seconds,
        "cpu_seconds": cpu,
    }
