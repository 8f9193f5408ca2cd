"""Train-and-evaluate runs through the real entry point (``superclip fit``), shared by the demo and the
ablation: one run is one ``superclip fit`` process whose final evaluation lands in ``metrics.json``."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

# The shapes evaluation sets (configs/demo.yaml) and the numbers the comparisons are made of.
ZEROSHOT_SETS = ("shape", "colour", "count")
RETRIEVAL_SET = "retrieval"
ZEROSHOT_TOP1 = [f"zeroshot/{s}/top1" for s in ZEROSHOT_SETS]
RETRIEVAL_R1 = [f"retrieval/{RETRIEVAL_SET}/i2t_R@1", f"retrieval/{RETRIEVAL_SET}/t2i_R@1"]
SHAPES_METRICS = [
    *(f"zeroshot/{s}/{m}" for s in ZEROSHOT_SETS for m in ("top1", "top5", "mean_per_class_recall")),
    *(f"retrieval/{RETRIEVAL_SET}/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
]


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The two summary numbers: mean zero-shot top-1 over the shapes sets, and mean retrieval R@1."""
    return {
        "zeroshot_mean_top1": sum(metrics[k] for k in ZEROSHOT_TOP1) / len(ZEROSHOT_TOP1),
        "retrieval_mean_R@1": sum(metrics[k] for k in RETRIEVAL_R1) / len(RETRIEVAL_R1),
    }


@dataclass
class Run:
    """One ``superclip fit`` run; its logs go to ``<out_dir>/<name>/<version>/``."""

    name: str
    config: str
    out_dir: Path
    version: str
    batch_size: int
    samples: int
    seed: int = 0
    warmup_samples: int = 1600
    extra: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return Path(self.out_dir) / self.name / self.version

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def args(self, progress: bool) -> list[str]:
        """Command-line arguments: the same data order and initialisation for every method at a seed,
        the same number of samples seen at every batch size, and one evaluation at the end."""
        return [
            "fit",
            "--config",
            self.config,
            "--seed_everything",
            str(self.seed),
            "--data.init_args.seed",
            str(self.seed),
            "--data.init_args.batch_size",
            str(self.batch_size),
            "--trainer.max_steps",
            str(self.steps),
            "--trainer.val_check_interval",
            str(self.steps),
            "--model.warmup_steps",
            str(max(1, round(self.warmup_samples / self.batch_size))),
            "--trainer.logger.init_args.save_dir",
            str(self.out_dir),
            "--trainer.logger.init_args.name",
            self.name,
            "--trainer.logger.init_args.version",
            self.version,
            "--trainer.enable_progress_bar",
            str(progress).lower(),
            *self.extra,
        ]


def _command(run: Run, progress: bool) -> list[str]:
    return [sys.executable, "-m", "superclip_pl", *run.args(progress)]


def run_all(
    runs: list[Run], jobs: int = 1, desc: str = "runs", on_done: Callable[[Run, dict], None] | None = None
) -> list[dict[str, float]]:
    """Run each ``Run`` as its own process, ``jobs`` at a time, and return their final metrics.

    With one job the run's own progress bar shows; with more, each run's output goes to ``train.log``
    in its log dir and one bar counts finished runs. Threads are split evenly between the jobs.
    ``on_done(run, metrics)`` is called as each run finishes (e.g. to save partial results).
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    pending, active, results = list(enumerate(runs)), {}, [None] * len(runs)
    bar = tqdm(total=len(runs), desc=desc, unit="run", disable=jobs == 1)
    while pending or active:
        while pending and len(active) < jobs:
            i, run = pending.pop(0)
            shutil.rmtree(run.log_dir, ignore_errors=True)  # a rerun replaces, never mixes, its logs
            run.log_dir.mkdir(parents=True)
            log = None if jobs == 1 else open(run.log_dir / "train.log", "w")  # noqa: SIM115
            if jobs == 1:
                print(f"\n== {run.name} ({run.version}): {run.samples} samples at batch {run.batch_size}")
            proc = subprocess.Popen(_command(run, progress=jobs == 1), env=env, stdout=log, stderr=log)
            active[i] = (proc, log, time.time())
        time.sleep(0.2)
        for i, (proc, log, start) in list(active.items()):
            if proc.poll() is None:
                continue
            del active[i]
            if log is not None:
                log.close()
            run = runs[i]
            if proc.returncode != 0:
                where = f"; see {run.log_dir / 'train.log'}" if log is not None else ""
                raise RuntimeError(f"run {run.name}/{run.version} failed (exit {proc.returncode}){where}")
            metrics = json.loads((run.log_dir / "metrics.json").read_text())
            results[i] = {**metrics, "seconds": round(time.time() - start, 1)}
            if on_done is not None:
                on_done(run, results[i])
            bar.update(1)
    bar.close()
    return results
