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
from typing import IO

from lightning.pytorch import Callback
from tqdm.auto import tqdm

# The shapes evaluation sets (configs/demo.yaml) and the numbers the comparisons are made of.
ZEROSHOT_SETS = ("shape", "colour", "size")
ALL_ZEROSHOT_SETS = ("shape", "colour", "size", "count")  # count: the classic set's (older runs)
RETRIEVAL_SET = "retrieval"
PROBE_SET = "probe"
ZEROSHOT_TOP1 = [f"zeroshot/{s}/top1" for s in ZEROSHOT_SETS]
RETRIEVAL_R1 = [f"retrieval/{RETRIEVAL_SET}/i2t_R@1", f"retrieval/{RETRIEVAL_SET}/t2i_R@1"]
SHAPES_METRICS = [
    *(f"zeroshot/{s}/{m}" for s in ZEROSHOT_SETS for m in ("top1", "top5", "mean_per_class_recall")),
    *(f"retrieval/{RETRIEVAL_SET}/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
    f"linprobe/{PROBE_SET}/top1",
]


class ProgressFile(Callback):
    """Write ``<global step> <max steps>`` to ``path`` every ``every`` steps (rank 0), so that a parent
    process running several trainings at once can show a progress bar for each.

    Args:
        path: the file to (over)write.
        every: optimizer steps between writes.
    """

    def __init__(self, path: str, every: int = 10):
        self.path, self.every = Path(path), every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{trainer.global_step} {trainer.max_steps}")
            tmp.replace(self.path)  # atomic: the reader never sees a half-written file


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or a one-line exit naming the extra to
    install (the library does not need matplotlib; only the demo's plots do)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "the demo's plots need matplotlib: pip install 'superclip-pl[demo]' (make install does it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The summary numbers: mean zero-shot top-1 over the shapes sets the run has (shape, colour, size;
    count in runs on the classic set), mean retrieval R@1 and the linear probe's top-1 (when the run
    had one)."""
    zeroshot = [metrics[f"zeroshot/{s}/top1"] for s in ALL_ZEROSHOT_SETS if f"zeroshot/{s}/top1" in metrics]
    out = {
        "zeroshot_mean_top1": sum(zeroshot) / len(zeroshot),
        "retrieval_mean_R@1": sum(metrics[k] for k in RETRIEVAL_R1) / len(RETRIEVAL_R1),
    }
    if f"linprobe/{PROBE_SET}/top1" in metrics:
        out["probe_top1"] = metrics[f"linprobe/{PROBE_SET}/top1"]
    return out


@dataclass
class Run:
    """One ``superclip fit`` run; its logs go to ``<out_dir>/<name>/<version>/``."""

    name: str
    configs: list[str]  # `superclip fit --config` files, in order (a baseline fragment after its run)
    out_dir: Path
    version: str
    batch_size: int
    samples: int
    seed: int = 0
    warmup_samples: int = 1600
    eval_every: int | None = None  # samples seen between evaluations; None: one, at the end
    extra: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return Path(self.out_dir) / self.name / self.version

    @property
    def progress_file(self) -> Path:
        return self.log_dir / "progress.txt"

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def eval_interval(self) -> int:
        """Optimizer steps between evaluations: the same samples seen at every batch size (the
        final model is evaluated as well when the interval does not divide the run)."""
        if self.eval_every is None:
            return self.steps
        return min(self.steps, max(1, round(self.eval_every / self.batch_size)))

    def args(self, progress: bool) -> list[str]:
        """Command-line arguments: the same data order and initialisation for every method at a seed,
        the same number of samples seen at every batch size, evaluations at ``eval_every`` samples
        and at the end."""
        return [
            "fit",
            *(arg for config in self.configs for arg in ("--config", config)),
            "--seed_everything",
            str(self.seed),
            "--data.init_args.seed",
            str(self.seed),
            "--data.init_args.batch_size",
            str(self.batch_size),
            "--trainer.max_steps",
            str(self.steps),
            "--trainer.val_check_interval",
            str(self.eval_interval),
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
    args = run.args(progress)
    if not progress:  # the parent shows a bar per run from this file instead
        spec = {
            "class_path": "superclip_pl.shapes.runs.ProgressFile",
            "init_args": {"path": str(run.progress_file)},
        }
        args.append(f"--trainer.callbacks+={json.dumps(spec)}")
    return [sys.executable, "-m", "superclip_pl", *args]


@dataclass
class _Active:
    proc: subprocess.Popen
    log: IO | None
    bar: tqdm | None
    slot: int = 0  # the screen line of its bar
    start: float = field(default_factory=time.time)


def run_all(
    runs: list[Run], jobs: int = 1, desc: str = "runs", on_done: Callable[[Run, dict], None] | None = None
) -> list[dict[str, float]]:
    """Run each ``Run`` as its own process, ``jobs`` at a time, and return their final metrics.

    With one job the run's own progress bar shows; with more, each run's output goes to ``train.log``
    in its log dir and a bar per running job (and one for all runs) follows them. Threads are split
    evenly between the jobs. ``on_done(run, metrics)`` is called as each run finishes.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    pending, active, results = list(enumerate(runs)), {}, [None] * len(runs)
    overall = (
        tqdm(total=len(runs), desc=desc, unit="run", position=0) if jobs > 1 and len(runs) > jobs else None
    )
    while pending or active:
        while pending and len(active) < jobs:
            i, run = pending.pop(0)
            shutil.rmtree(run.log_dir, ignore_errors=True)  # a rerun replaces, never mixes, its logs
            run.log_dir.mkdir(parents=True)
            if jobs == 1:
                print(f"\n== {run.name} ({run.version}): {run.samples} samples at batch {run.batch_size}")
                active[i] = _Active(subprocess.Popen(_command(run, progress=True), env=env), None, None)
                continue
            log = open(run.log_dir / "train.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(_command(run, progress=False), env=env, stdout=log, stderr=log)
            slot = min(set(range(1, jobs + 1)) - {a.slot for a in active.values()})
            bar = tqdm(
                total=run.steps, desc=f"{run.name} {run.version}", unit="step", position=slot, leave=False
            )
            active[i] = _Active(proc, log, bar, slot)
        time.sleep(0.5)
        for i, job in list(active.items()):
            run = runs[i]
            if job.bar is not None and run.progress_file.exists():
                job.bar.update(int(run.progress_file.read_text().split()[0]) - job.bar.n)
            if job.proc.poll() is None:
                continue
            del active[i]
            if job.log is not None:
                job.log.close()
                job.bar.close()
            if job.proc.returncode != 0:
                where = f"; see {run.log_dir / 'train.log'}" if job.log is not None else ""
                raise RuntimeError(f"run {run.name}/{run.version} failed (exit {job.proc.returncode}){where}")
            metrics = json.loads((run.log_dir / "metrics.json").read_text())
            results[i] = {**metrics, "seconds": round(time.time() - job.start, 1)}
            tqdm.write(f"{run.name} {run.version}: done in {results[i]['seconds']:.0f} s")
            if on_done is not None:
                on_done(run, results[i])
            if overall is not None:
                overall.update(1)
    if overall is not None:
        overall.close()
    return results
