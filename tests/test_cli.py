"""The real entry points end to end on a small shapes data set: `superclip fit|validate|test`, the demo."""

import json
import math
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from superclip_pl import demo, synthetic
from superclip_pl.cli import main
from superclip_pl.experiments import SHAPES_METRICS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONTRACT = [
    *(f"zeroshot/shape/{m}" for m in ("top1", "top5")),
    *(f"retrieval/retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A directory holding a small `data/shapes` (what `make data` writes, at a fraction of the size)."""
    root = tmp_path_factory.mktemp("project")
    synthetic.generate(
        root / "data" / "shapes",
        train_samples=256,
        eval_samples=24,
        retrieval_samples=24,
        shard_size=64,
        num_workers=1,
        progress=False,
    )
    return root


def scalars(log_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_debug_fit_then_validate_and_test(shapes, monkeypatch):
    monkeypatch.chdir(shapes)
    shutil.rmtree("outputs", ignore_errors=True)
    fit = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "debug.yaml"),
            "--trainer.max_steps",
            "24",
            "--trainer.val_check_interval",
            "24",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    log_dir = Path(fit.trainer.log_dir)
    assert (log_dir / "config.yaml").exists()  # the resolved config, to rerun exactly
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    assert list(log_dir.glob("events.out.tfevents.*"))
    losses = scalars(log_dir, "train/loss")
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # falling
    for tag in ("train/contrastive_loss", "train/class_loss", "train/lr", "train/samples_seen", "val/loss"):
        assert scalars(log_dir, tag), tag
    assert scalars(log_dir, "train/samples_seen")[-1] == 24 * 8
    assert json.loads((log_dir / "metrics.json").read_text())["zeroshot/shape/top1"] >= 0

    for stage in ("validate", "test"):
        run = main(
            [
                stage,
                "--config",
                str(CONFIGS / "debug.yaml"),
                "--ckpt_path",
                str(ckpt),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        metrics = json.loads((Path(run.trainer.log_dir) / "metrics.json").read_text())
        assert set(CONTRACT) <= set(metrics), stage
        assert all(0 <= metrics[k] <= 1 for k in CONTRACT)
        # validate reads data.val; test has no data.test: one empty step, then the callbacks evaluate
        assert ("val/loss" in metrics) == (stage == "validate") and "test/loss" not in metrics


def test_wrong_column_fails_at_once_with_the_choices(shapes, monkeypatch, capsys):
    monkeypatch.chdir(shapes)
    with pytest.raises(ValueError, match=r"image_column='jpeg'.*png"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "debug.yaml"),
                "--data.train.image_column",
                "jpeg",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )


@pytest.mark.slow
def test_shortened_demo_writes_its_summary_and_plot(shapes, monkeypatch):
    monkeypatch.chdir(shapes)
    summary = demo.main(
        [
            "--samples",
            "48",
            "--batch-size",
            "8",
            "--configs-dir",
            str(CONFIGS),
            "--output-dir",
            "outputs/demo",
        ]
    )
    out = shapes / "outputs" / "demo"
    assert (out / "comparison.png").stat().st_size > 1000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["setup"]["samples"] == 48 and saved["setup"]["batch_size"] == 8
    for method in ("clip", "superclip"):
        assert set(SHAPES_METRICS) <= set(saved[method])
        assert saved[method]["train/samples_seen"] == 48
    assert "train/class_loss" in saved["superclip"] and "train/class_loss" not in saved["clip"]
    assert {r["metric"] for r in saved["comparison"]} >= set(SHAPES_METRICS)
    assert summary["comparison"] == saved["comparison"]
    assert list((out / "superclip").rglob("events.out.tfevents.*"))
