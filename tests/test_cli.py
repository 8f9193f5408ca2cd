"""The real entry points end to end on a small shapes data set: `superclip fit|validate|test`, the demo."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from superclip_pl.cli.main import build_cli, main
from superclip_pl.shapes import ablation, dataset, demo
from superclip_pl.shapes.runs import SHAPES_METRICS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONTRACT = [
    *(f"zeroshot/shape/{m}" for m in ("top1", "top5")),
    *(f"retrieval/retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A directory holding a small `data/shapes` (what `make data` writes, at a fraction of the size)."""
    root = tmp_path_factory.mktemp("project")
    dataset.generate(
        root / "data" / "shapes",
        train_samples=256,
        eval_samples=24,
        retrieval_samples=24,
        probe_samples=48,
        shard_size=64,
        num_workers=1,
        progress=False,
    )
    return root


def logged(log_dir: Path, tag: str) -> list:
    """The scalar events of `tag` in every event file of `log_dir`, in the order they were written.

    A run can leave several files (Lightning closes the writer at the end of fit, and the final
    evaluation opens a new one); EventAccumulator orders them by file name, whose last field is a
    per-process counter ("...9" sorts after "...10"), so files opened in the same second can come out
    in the wrong order."""
    points = []
    for path in Path(log_dir).glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        points += events.Scalars(tag) if tag in events.Tags()["scalars"] else []
    return sorted(points, key=lambda e: e.wall_time)


def scalars(log_dir: Path, tag: str) -> list[float]:
    return [e.value for e in logged(log_dir, tag)]


def debug_fit(steps: int, val_every: int, *extra: str) -> list[str]:
    """`superclip fit` arguments: the debug config for `steps` steps, validating every `val_every`."""
    return [
        "fit",
        "--config",
        str(CONFIGS / "debug.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(val_every),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.mark.slow
def test_debug_fit_then_validate_and_test(shapes, monkeypatch):
    monkeypatch.chdir(shapes)
    shutil.rmtree("outputs", ignore_errors=True)
    fit = build_cli(debug_fit(24, 24))
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
    final = json.loads((log_dir / "metrics.json").read_text())
    assert final["zeroshot/shape/top1"] >= 0
    assert 0 <= final["linprobe/probe/top1"] <= 1  # the debug config's probe, on the probe set's splits

    for stage in ("validate", "test"):
        run = build_cli(
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


def test_fit_evaluates_and_saves_the_final_model_when_the_intervals_stop_short_of_it(
    shapes, monkeypatch, capsys
):
    """Validation (and so checkpoints) every 10 steps of a 24-step run: evaluations at 10 and 20, and
    one more at 24, so metrics.json never holds the numbers of an earlier model; last.ckpt is step 24."""
    monkeypatch.chdir(shapes)
    fit = build_cli(debug_fit(24, 10, "--trainer.logger.init_args.save_dir", "outputs/short_interval"))
    log_dir = Path(fit.trainer.log_dir)
    for tag in ("val/loss", "retrieval/retrieval/i2t_R@1", "zeroshot/shape/top1"):
        steps = [e.step for e in logged(log_dir, tag)]  # Lightning logs those during fit at step - 1
        assert len(steps) == 3 and steps[0] < steps[1] < steps[2] == 24, (tag, steps)
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["train/samples_seen"] == 24 * 8 and "train/class_loss" in metrics  # kept from fit
    assert metrics["val/loss"] == pytest.approx(scalars(log_dir, "val/loss")[-1])
    assert metrics["zeroshot/shape/top1"] == pytest.approx(scalars(log_dir, "zeroshot/shape/top1")[-1])
    out = capsys.readouterr().out
    assert "last evaluation was at step 20" in out and "Evaluation at step 24" in out
    last = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 24
    assert all(v.equal(fit.model.state_dict()[k]) for k, v in last["state_dict"].items())


@pytest.mark.slow
def test_ddp_fit_through_the_entry_point_ends_with_the_final_model(shapes, tmp_path):
    """`superclip fit` on 2 gloo processes (a subprocess: DDP relaunches the command line): every rank
    takes part in the end-of-fit work (the log-dir broadcast, the extra evaluation, the final save),
    so the run exits 0 with metrics.json and last.ckpt of the last step, each announced once."""
    args = debug_fit(12, 5, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "superclip_pl", *args],
        cwd=shapes,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = tmp_path / "superclip" / "version_0"
    assert set(CONTRACT) <= set(json.loads((log_dir / "metrics.json").read_text()))
    last = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 12
    assert proc.stdout.count("last evaluation was at step 10, training ended at step 12") == 1
    assert proc.stdout.count("Evaluation at step 12") == 1


def test_wrong_column_fails_at_once_with_the_choices(shapes, monkeypatch, capsys):
    monkeypatch.chdir(shapes)
    args = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--data.train.image_column", "jpeg"]
    assert main([*args, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert re.search(r"^superclip fit: error: .*image_column='jpeg'.*png", err)


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
    assert saved["setup"]["seeds"] == [0]
    runs = saved["seeds"]["0"]
    for method in ("clip", "superclip"):
        assert set(SHAPES_METRICS) <= set(runs[method])
        assert runs[method]["train/samples_seen"] == 48
    assert "train/class_loss" in runs["superclip"] and "train/class_loss" not in runs["clip"]
    assert {r["metric"] for r in saved["comparison"]} >= set(SHAPES_METRICS)
    assert summary["comparison"] == saved["comparison"]
    assert list((out / "superclip").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_shortened_ablation_evaluates_every_run_at_its_end_and_resumes(shapes, monkeypatch, capsys):
    """Two batch sizes at 40 samples, an evaluation every 24 samples (6 and 3 steps: neither divides
    the run): every run's recorded metrics are those of its final model, and a second call reruns
    nothing."""
    monkeypatch.chdir(shapes)
    argv = ["--batch-sizes", "4", "8", "--seeds", "0", "--samples", "40", "--eval-every", "24"]
    argv += ["--configs-dir", str(CONFIGS), "--output-dir", "outputs/ablation"]
    results = ablation.main(argv)
    out = shapes / "outputs" / "ablation"
    assert (out / "ablation.png").stat().st_size > 1000
    assert sorted(results["runs"]) == sorted(
        f"{m}/bs{b}/seed0" for m in ("clip", "superclip") for b in (4, 8)
    )
    setup = results["setup"]
    assert set(results["paired"]) == {"4", "8"} and (setup["samples"], setup["eval_every"]) == (40, 24)
    for key, run in results["runs"].items():
        assert run["metrics"]["train/samples_seen"] == 40 and run["fingerprint"] == setup, key
        method, bs = run["method"], run["batch_size"]
        shape = logged(out / method / f"bs{bs}-seed0", "zeroshot/shape/top1")
        assert [e.step for e in shape][-1] == 40 // bs and len(shape) == 2, key  # at 24 samples and the end
        assert run["metrics"]["zeroshot/shape/top1"] == pytest.approx(shape[-1].value), key
    capsys.readouterr()
    again = ablation.main(argv)
    assert "4 runs, 4 already done, 0 to go" in capsys.readouterr().out
    assert again["runs"] == results["runs"]


@pytest.mark.slow
def test_resume_continues_the_same_run(shapes, monkeypatch, capsys):
    """fit 8 steps, resume to 16: the same log directory, step labels that go on without overlap, a
    notice of the schedule's new length, and validate of the checkpoint names its step."""
    monkeypatch.chdir(shapes)
    save = ["--trainer.logger.init_args.save_dir", "outputs/resume"]
    first = build_cli(debug_fit(8, 8, *save))
    log_dir = Path(first.trainer.log_dir)
    ckpt = str(log_dir / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    second = build_cli(debug_fit(16, 8, *save, "--ckpt_path", ckpt))
    assert Path(second.trainer.log_dir) == log_dir and second.trainer.global_step == 16
    captured = capsys.readouterr()
    assert "resuming at step 8 with max_steps=16 (the checkpoint's run had 8)" in captured.out + captured.err
    parts = []
    for events_file in sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            parts.append([e.step for e in events.Scalars("train/loss")])
    assert len(parts) == 2 and parts[0] and parts[1]
    assert max(parts[0]) < min(parts[1]) and parts[1] == sorted(parts[1]) and max(parts[1]) == 15
    lr = scalars(log_dir, "train/lr")
    assert all(v > 0 for v in lr[:-1])  # the schedule over 16 steps goes on, no step at lr 0 in between
    assert main(["validate", "--config", str(CONFIGS / "debug.yaml"), "--ckpt_path", ckpt]) == 0
    assert "Evaluation at step 16:" in capsys.readouterr().out
