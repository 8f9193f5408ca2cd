"""The installed `superclip` command as a user runs it, in a subprocess: exit statuses, what lands on
stderr for wrong input, and a fit -> validate -> export -> transformers.pipeline round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_cli import CONFIGS, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

SUPERCLIP = Path(sys.executable).parent / "superclip"  # the console script pip installed
DEBUG = str(CONFIGS / "debug.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def superclip(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(SUPERCLIP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def fitted(shapes):  # noqa: F811
    """One `superclip fit --config configs/debug.yaml` shared by the tests: (project dir, last.ckpt)."""
    proc = superclip("fit", "--config", DEBUG, *QUIET, cwd=shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = shapes / "outputs" / "debug" / "superclip" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return shapes, ckpt


@pytest.mark.slow
def test_fit_validate_export_and_load_in_a_pipeline(fitted, tmp_path):
    from transformers import pipeline

    root, ckpt = fitted
    proc = superclip("validate", "--config", DEBUG, "--ckpt_path", str(ckpt), *QUIET, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Evaluation at step 8:" in proc.stdout  # the checkpoint's step, not 0
    metrics = json.loads((root / "outputs/debug/superclip/version_1/metrics.json").read_text())
    assert 0 <= metrics["zeroshot/shape/top1"] <= 1
    out = tmp_path / "exported"
    proc = superclip("export", "--ckpt_path", str(ckpt), "--output_dir", str(out), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by group and others
    scores = pipeline("zero-shot-image-classification", model=str(out))(
        Image.new("RGB", (32, 32), "red"), candidate_labels=["a red circle", "a blue square"]
    )
    assert sum(s["score"] for s in scores) == pytest.approx(1.0)


FIT, VALIDATE = ["fit", "--config", DEBUG], ["validate", "--config", DEBUG]


@pytest.mark.slow
def test_predict_writes_the_embeddings_of_a_data_set(fitted, tmp_path):
    from safetensors.torch import load_file

    root, ckpt = fitted
    source = '{path: webdataset, data_files: "data/shapes/eval/retrieval/test/*.tar", image_column: png}'
    args = ["--data.predict", source, "--trainer.callbacks+=superclip_pl.EmbeddingWriter"]
    args += ["--trainer.callbacks.output_dir", str(tmp_path / "emb"), "--return_predictions", "false"]
    proc = superclip("predict", "--config", DEBUG, "--ckpt_path", str(ckpt), *args, *QUIET, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = load_file(tmp_path / "emb" / "embeddings-rank0.safetensors")
    assert (tmp_path / "emb" / "embeddings-rank0.safetensors").stat().st_mode & 0o044 == 0o044  # shareable
    keys = (tmp_path / "emb" / "embeddings-rank0.keys.txt").read_text().splitlines()
    assert len(keys) == len(set(keys)) == 24  # the fixture's retrieval set, each sample once
    for name in ("image_embeds", "text_embeds"):
        assert tensors[name].shape == (24, 32)  # debug.yaml's projection_dim
        torch.testing.assert_close(tensors[name].norm(dim=-1), torch.ones(24))


BAD_INPUTS = {  # what a user types -> what the one line must name
    "batch size": ([*FIT, "--data.batch_size", "-4"], "data.batch_size=-4"),
    "missing checkpoint": ([*FIT, "--ckpt_path", "nope.ckpt"], "'nope.ckpt' does not exist"),
    "corrupt checkpoint": ([*VALIDATE, "--ckpt_path", "CORRUPT"], "not a SuperCLIP checkpoint"),
    "data files": ([*FIT, "--data.train.data_files", "no/*.tar"], "'no/*.tar' matches no file"),
    "caption column": (
        [*FIT, "--data.train.text_column", "caption"],
        "text_column: 'caption' is not a column",
    ),
    "vocab size": (
        [*FIT, "--model.backbone_config", "{text_config: {vocab_size: 64}}"],
        "backbone_config.text_config.vocab_size",
    ),
    "tokenizer": ([*FIT, "--data.tokenizer", "data/none/tok"], "data.tokenizer='data/none/tok'"),
    "jpeg decoder": ([*FIT, "--data.jpeg_decoder", "turbo"], "data.jpeg_decoder='turbo'"),
    "unknown option": ([*FIT, "--model.learning_rate", "1"], "--model.learning_rate"),
    "bad value": ([*FIT, "--model.lr", "fast"], '"model.lr"'),
    "no command": ([], "a command is required"),
    "export": (["export", "--ckpt_path", "nope.ckpt", "--output_dir", "x"], "'nope.ckpt' does not exist"),
    "import": (["import", "--ckpt_path", "nope.pt", "--output_dir", "x"], "does not exist"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(fitted, case, tmp_path):
    root, _ = fitted
    args, expected = BAD_INPUTS[case]
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    args = [str(corrupt) if a == "CORRUPT" else a for a in args]
    proc = superclip(*args, cwd=root)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[-1] and lines[-1].startswith("superclip"), lines
    assert "weights_only=False" not in proc.stderr


@pytest.mark.slow
def test_the_traceback_switch_shows_the_traceback(fitted):
    root, _ = fitted
    proc = superclip(
        "fit", "--config", DEBUG, "--data.batch_size", "0", cwd=root, env={"SUPERCLIP_TRACEBACK": "1"}
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "data.batch_size=0" in proc.stderr


def test_help_lists_the_commands_without_importing_lightning():
    for args in (["--help"], ["export", "--help"], ["import", "--help"]):
        probe = "import sys; sys.argv = ['superclip', *sys.argv[1:]]; from superclip_pl.cli import main; "
        probe += "code = main(); assert not {'lightning', 'torch'} & set(sys.modules); sys.exit(code)"
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(SUPERCLIP), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("fit", "validate", "test", "predict", "export", "import"):
        assert f"\n  {command} " in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["recipes"]])
def test_a_reader_that_leaves_ends_the_command_quietly(args):
    """`superclip --help | head -1`: stdout's reader is gone before anything is written; the command
    ends as `yes | head` does (141, SIGPIPE's status), with nothing on stderr. A command's --help is
    argparse's, which ignores a failed write and exits 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(SUPERCLIP), *args], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=120
    )
    os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == (0 if args == ["fit", "--help"] else 141)
