"""Non-finite steps are skipped and counted, a diverging run stops with exit 1 and a finite checkpoint,
checkpoint files are whole or absent, and a resume that changes the accumulation mode keeps its step."""

import re
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from superclip_pl.cli.main import build_cli
from superclip_pl.train.checkpoint_io import AtomicCheckpointIO
from test_long_runs import SUPERCLIP, environment, write_config


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Poison(Callback):
    """NaN images in the first micro-batch of optimizer step `step` (counted from 0); the module's state
    before and after that step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.before is None:
            self.before = state(pl_module)
            batch["pixel_values"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and self.after is None:
            self.after = state(pl_module)


@pytest.mark.parametrize("accumulate", [1, 2])  # automatic optimisation; negatives across accumulation
def test_an_isolated_non_finite_step_is_skipped_and_counted(tmp_path, good_shards, tokenizer_dir, accumulate):
    config = write_config(tmp_path / "c.yaml", tmp_path, good_shards[0], tokenizer_dir)
    args = ["--config", str(config), "--trainer.max_steps", "5", "--trainer.callbacks", "[]"]
    cli = build_cli([*args, "--trainer.accumulate_grad_batches", str(accumulate)], run=False)
    poison = Poison(step=2)
    cli.trainer.callbacks.append(poison)
    with pytest.warns(UserWarning, match=r"step 3: non-finite loss or gradients, step skipped"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 5 and cli.trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert poison.before.keys() == poison.after.keys()
    changed = [k for k in poison.before if not torch.equal(poison.before[k], poison.after[k])]
    assert changed == ["samples_seen"]  # weights and IDF counts (doc_freq.*) untouched; the batch was read
    final = state(cli.model)
    assert all(v.isfinite().all() for v in final.values() if v.is_floating_point())
    assert not torch.equal(
        final["model.clip.visual_projection.weight"], poison.after["model.clip.visual_projection.weight"]
    )


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_1_and_a_finite_checkpoint(tmp_path, good_shards, tokenizer_dir):
    config = write_config(tmp_path / "c.yaml", tmp_path, good_shards[0], tokenizer_dir)
    command = [
        str(SUPERCLIP),
        "fit",
        "--config",
        str(config),
        "--model.lr",
        "1e6",
        "--model.warmup_steps",
        "0",
    ]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    line = [t for t in done.stderr.splitlines() if t.startswith("superclip fit: error: training diverged")]
    assert len(line) == 1 and "lower model.lr" in line[0] and "Traceback" not in done.stderr
    path = re.search(r"saved to (\S+\.ckpt);", line[0]).group(1)
    ckpt = torch.load(path, weights_only=True)
    assert 0 < ckpt["global_step"] < 30 and f"diverged-step={ckpt['global_step']}.ckpt" in path
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(
    tmp_path, monkeypatch, good_shards, tokenizer_dir
):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def half_then_fail(obj, f):  # a write that dies half-way (a full disk, a lost mount, a kill)
        f.write(b"PK\x03\x04" + b"\0" * 5000)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind
    (path.parent / ".last.ckpt.tmp-1").write_bytes(b"from a killed write")
    io.save_checkpoint({"global_step": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    config = write_config(tmp_path / "c.yaml", tmp_path / "out", good_shards[0], tokenizer_dir)
    cli = build_cli(["--config", str(config)], run=False)  # the CLI's trainers write through it
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class Steps(Callback):
    def __init__(self) -> None:
        self.taken = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.taken += 1


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_a_resume_that_changes_the_accumulation_mode_keeps_the_step(
    tmp_path, good_shards, tokenizer_dir, before, after
):
    config = write_config(tmp_path / "c.yaml", tmp_path / "out", good_shards[0], tokenizer_dir)

    def fit(k: int, max_steps: int, ckpt_path: Path | None = None):
        args = ["--config", str(config), "--trainer.max_steps", str(max_steps), "--trainer.callbacks", "[]"]
        args += ["--trainer.accumulate_grad_batches", str(k), "--trainer.default_root_dir", str(tmp_path)]
        args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
        cli, steps = build_cli(args, run=False), Steps()
        cli.trainer.callbacks.append(steps)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return cli.trainer, steps.taken

    trainer, taken = fit(before, 3)
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    assert taken == 3 and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    trainer, taken = fit(after, 6, tmp_path / "three.ckpt")
    assert taken == 3 and trainer.global_step == 6  # not 3 + 6: the step count went on
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 6  # the loggers' step labels too
