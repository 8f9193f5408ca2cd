"""`superclip fit` with gradient accumulation and on 2 gloo processes, through the real entry point."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shards import write_shards
from superclip_pl.cli.main import build_cli
from test_cli import debug_fit, scalars, shapes  # noqa: F401 (shapes: the data set fixture)


def fit_losses(save_dir: str, accumulate: int, *extra: str) -> dict[str, list[float]]:
    """3 steps, validating after the last (the interval counts micro-batches)."""
    extra = ("--trainer.accumulate_grad_batches", str(accumulate), "--trainer.log_every_n_steps", "1", *extra)
    fit = build_cli(debug_fit(3, 3 * accumulate, "--trainer.logger.init_args.save_dir", save_dir, *extra))
    log_dir = Path(fit.trainer.log_dir)
    return {
        tag: scalars(log_dir, tag) for tag in ("train/contrastive_loss", "train/loss", "train/samples_seen")
    }


def test_four_accumulated_micro_batches_train_like_one_batch_of_sixteen(shapes, monkeypatch):  # noqa: F811
    """A fresh model's first contrastive loss at 4 x 4 is that of batch 16 (more negatives: higher at
    initialisation), not that of batch 4, and so are the next steps; one point logged per step."""
    monkeypatch.chdir(shapes)
    accumulated = fit_losses("outputs/acc", 4, "--data.batch_size", "4")
    whole = fit_losses("outputs/whole", 1, "--data.batch_size", "16")
    plain = ("--data.batch_size", "4", "--model.accumulated_negatives", "false")
    per_micro_batch = fit_losses("outputs/plain", 4, *plain)
    assert accumulated["train/samples_seen"] == whole["train/samples_seen"] == [16.0, 32.0, 48.0]
    for tag in ("train/contrastive_loss", "train/loss"):
        assert accumulated[tag] == pytest.approx(whole[tag], rel=1e-5), tag
    # Lightning's accumulation: the contrastive loss of 4 pairs, lower at initialisation than that of 16
    assert per_micro_batch["train/contrastive_loss"][0] < accumulated["train/contrastive_loss"][0] - 0.5


def test_two_same_seed_runs_with_a_worker_and_accumulation_repeat_exactly(shapes, monkeypatch):  # noqa: F811
    monkeypatch.chdir(shapes)
    runs = []
    for name in ("first", "second"):
        extra = ["--data.num_workers", "1", "--trainer.accumulate_grad_batches", "2"]
        save = ("--trainer.logger.init_args.save_dir", f"outputs/repeat_{name}")
        fit = build_cli(debug_fit(4, 4, *save, *extra))
        log_dir = Path(fit.trainer.log_dir)
        runs.append((json.loads((log_dir / "metrics.json").read_text()), scalars(log_dir, "train/loss")))
    assert runs[0] == runs[1]
    assert {"train/loss", "val/loss", "zeroshot/shape/top1"} <= set(runs[0][0])


@pytest.mark.slow
def test_two_gloo_ranks_validate_five_samples_at_batch_two(shapes, tmp_path):  # noqa: F811
    """Ranks get 3 and 2 validation samples (batches 2 + 1 and 2): the validation loss is local to each
    rank, so nothing waits on a rank that has no batch left; the run exits 0 and logs val/loss."""
    write_shards(tmp_path / "val", num_shards=1, per_shard=5)
    val = {"path": "webdataset", "data_files": str(tmp_path / "val" / "*.tar"), "split": "train"}
    args = debug_fit(4, 4, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size", "2")
    args += ["--trainer.accumulate_grad_batches", "2", "--trainer.limit_val_batches", "null"]
    args += ["--data.val", json.dumps(val | {"image_column": "png", "text_column": "txt"})]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    proc = subprocess.run(
        [sys.executable, "-m", "superclip_pl", *args], cwd=shapes, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = tmp_path / "logs" / "superclip" / "version_0"
    assert "val/loss" in json.loads((log_dir / "metrics.json").read_text())
    passes = len(scalars(log_dir, "val/loss"))
    read = re.search(
        r"data\.val: (\d+) samples read, 0 skipped \(\S+; this rank\)", proc.stdout + proc.stderr
    )
    assert passes >= 1 and int(read.group(1)) == 3 * passes  # rank 0 reads 3 of the 5 samples a pass
