"""Runs that are stopped and started again lose nothing: SIGTERM, SIGINT and SIGKILL at random steps,
each followed by the identical `superclip fit ... --ckpt_path last`, end with the weights, IDF counts,
sample keys and global RNG draws of a run that was never stopped (the installed console script, as a
scheduler runs it)."""

import importlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MICRO
from run_probe import read
from shards import write_shards

SUPERCLIP = Path(sys.executable).parent / "superclip"
TESTS = Path(__file__).resolve().parent
STEPS, EVERY = 30, 5  # optimizer steps of a run; a periodic checkpoint every EVERY steps


def write_config(path: Path, out: Path, shards: str, tokenizer_dir: str, devices: int = 1, **data) -> Path:
    """A `superclip fit` config of a micro model writing into `out`, logging keys to out/keys-<rank>."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            **({"strategy": "ddp"} if devices > 1 else {}),
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(out), "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": EVERY},
                },
                {"class_path": "run_probe.KeysLog", "init_args": {"path": str(out / "keys-{rank}.jsonl")}},
            ],
        },
        "model": {"backbone_config": MICRO, "warmup_steps": 2, "lr": 1e-3},
        "data": {
            "class_path": "superclip_pl.ImageTextDataModule",
            "init_args": {
                "tokenizer": tokenizer_dir,
                "train": {"path": "webdataset", "data_files": shards, "image_column": "png"},
                "batch_size": 4,
                "num_workers": 0,
                "max_length": 16,
                "shuffle_buffer": 5,
                **data,
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def environment() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def fit(config: Path) -> list[str]:
    return [str(SUPERCLIP), "fit", "--config", str(config), "--ckpt_path", "last"]


def fit_here(command: list[str]) -> int:
    """`command` (a `superclip` command line) run in this process, on one thread as the subprocesses
    are (the uninterrupted reference run, without the start-up of another Python)."""
    from superclip_pl.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(TESTS))
    try:
        return main(command[1:])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(TESTS))


def run_killed(command: list[str], keys: Path, at_step: int, signum: int, group: bool) -> subprocess.Popen:
    """Start `command`, send `signum` once its keys log shows `at_step` (to its process group with `group`,
    as schedulers signal every process of a job), and wait for it to end."""
    start = len(read(keys)) if keys.exists() else 0
    proc = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        lines = read(keys)[start:] if keys.exists() else []
        if lines and lines[-1]["step"] >= at_step:
            (os.killpg if group else os.kill)(proc.pid, signum)
            break
        time.sleep(0.01)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    return proc


def final_state(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def assert_same_run(resumed: Path, uninterrupted: Path, ranks: int = 1) -> None:
    """The final weights and IDF counts are identical, and every batch any attempt trained (steps redone
    after a SIGKILL included) had the keys and global RNG draws the uninterrupted run had at that step."""
    ours, theirs = final_state(resumed), final_state(uninterrupted)
    assert ours.keys() == theirs.keys() and any("doc_freq.df" in k for k in ours)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []
    for rank in range(ranks):
        expected = {line["step"]: line for line in read(uninterrupted / f"keys-{rank}.jsonl")}
        lines = read(resumed / f"keys-{rank}.jsonl")
        assert sorted({line["step"] for line in lines}) == sorted(expected) == list(range(STEPS))
        assert all(line == expected[line["step"]] for line in lines)


@pytest.mark.slow
def test_kills_at_random_steps_lose_nothing(tmp_path, good_shards, tokenizer_dir):
    """SIGTERM (to the process group), SIGKILL and SIGINT at random steps, each followed by the identical
    command line, which resumes from the newest last.ckpt (the SIGKILL loses the steps since the last
    periodic checkpoint, which are redone exactly). The first start has nothing to resume."""
    full = tmp_path / "full"
    assert fit_here(fit(write_config(tmp_path / "full.yaml", full, good_shards[0], tokenizer_dir))) == 0

    out = tmp_path / "killed"
    command = fit(write_config(tmp_path / "killed.yaml", out, good_shards[0], tokenizer_dir))
    keys, last = out / "keys-0.jsonl", out / "run" / "version_0" / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    plan = [(signal.SIGTERM, True), (signal.SIGKILL, False), (signal.SIGINT, False)]
    bounds = [(3, 9), (11, 18), (20, 27)]
    for (signum, group), (low, high) in zip(plan, bounds, strict=True):
        first = len(read(keys)) if keys.exists() else 0
        start = torch.load(last, weights_only=True)["global_step"] if last.exists() else 0
        proc = run_killed(command, keys, rng.randint(low, high), signum, group)
        if not first:
            assert "--ckpt_path last: nothing to resume in" in proc.stdout_text
        assert read(keys)[first]["step"] == start  # each start continues from the newest last.ckpt
        if signum == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        # stopped at the end of an optimizer step: 128 + signum, last.ckpt of that step, one line
        assert proc.returncode == 128 + signum, proc.stderr_text[-3000:]
        reached = read(keys)[-1]["step"] + 1  # the step of the last batch trained, counted from 1
        assert torch.load(last, weights_only=True)["global_step"] == reached
        name = signal.Signals(signum).name
        assert (
            f"superclip fit: stopped by {name} at step {reached}; the model is saved to {last}; resume with: "
            f"superclip fit --config {command[3]} --ckpt_path last\n"
        ) in proc.stderr_text
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resuming step \d+ of .*: logging into it", done.stdout)
    assert sorted(p.name for p in (out / "run").iterdir()) == ["version_0"]  # one run, one directory
    assert_same_run(out, full)


@pytest.mark.slow
def test_two_gloo_ranks_stopped_by_sigterm_resume_exactly(tmp_path, tokenizer_dir):
    """2 ranks on 3 shards (every rank reads all of them, keeping 1 sample in 2); SIGTERM to rank 0 alone:
    both ranks stop after the same step with exit 143, and the resumed run ends as the uninterrupted one."""
    write_shards(tmp_path / "shards", num_shards=3, per_shard=7)
    shards = str(tmp_path / "shards" / "*.tar")
    full = tmp_path / "full"
    done = subprocess.run(fit(write_config(tmp_path / "full.yaml", full, shards, tokenizer_dir, devices=2)),
                          env=environment(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "stopped"
    command = fit(write_config(tmp_path / "stopped.yaml", out, shards, tokenizer_dir, devices=2))
    proc = run_killed(command, out / "keys-0.jsonl", random.Random(1).randint(6, 14), signal.SIGTERM, False)
    assert proc.returncode == 143, proc.stderr_text[-3000:]
    assert proc.stderr_text.count("superclip fit: stopped by SIGTERM") == 1  # rank 0 says it, once
    steps = [read(out / f"keys-{r}.jsonl")[-1]["step"] for r in range(2)]
    assert steps[0] == steps[1]  # the same step on both ranks
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, full, ranks=2)


def test_lightnings_own_sigterm_exit_is_not_a_success(monkeypatch, capsys):
    """Outside training (setup, validate, test) Lightning's handler ends a run with its SIGTERMException,
    a SystemExit without a code, which would be status 0: it is 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    cli_main = importlib.import_module("superclip_pl.cli.main")  # the module (`cli.main` is the function)

    def stopped(argv, from_sys_argv):
        raise SIGTERMException()

    monkeypatch.setattr(cli_main, "_dispatch", stopped)
    assert cli_main.main(["validate", "--config", "x.yaml"]) == 143
    assert capsys.readouterr().err == "superclip validate: stopped by SIGTERM\n"


def test_the_resume_command_replaces_any_ckpt_path():
    from superclip_pl.cli.main import resume_command

    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "x.ckpt", "--trainer.max_steps=9"]
    assert resume_command(argv) == "superclip fit --config 'a b.yaml' --trainer.max_steps=9 --ckpt_path last"
    assert resume_command(["fit", "--ckpt_path=last"]) == "superclip fit --ckpt_path last"
