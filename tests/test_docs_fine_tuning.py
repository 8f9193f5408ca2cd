"""docs/fine_tuning.md as written: every ```bash and ```python block not marked `<!-- not run: ... -->`
runs, in order, in a project directory holding a (small) demo data set and configs/, through the
installed `superclip`; then what the walk-through promises is checked in the files it wrote. And
SuperClass's two stages, at the debug config's size, through the installed script."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig

from superclip_pl.cli.main import main
from test_cli import CONFIGS, logged, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

PAGE = Path(__file__).resolve().parent.parent / "docs" / "fine_tuning.md"
BIN = str(Path(sys.executable).parent)  # where the installed `superclip` is


def all_blocks(text: str) -> list[tuple[str, str, bool]]:
    """``(language, code, runs)`` of the page's bash and python blocks; ``runs`` is False for a block
    marked `<!-- not run: ... -->` on the line before it."""
    out = []
    for match in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((match.group(1), match.group(2), not before.startswith("<!-- not run:")))
    return out


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code, runs in all_blocks(text) if runs]


@pytest.fixture(scope="module")
def project(shapes, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("fine_tuning")
    (root / "data").symlink_to(shapes / "data")
    (root / "configs").symlink_to(CONFIGS)
    return root


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def commands(code: str) -> list[list[str]]:
    """The `superclip` command lines of a bash block (continuation lines joined)."""
    lines = [shlex.split(line) for line in code.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(args[0] == "superclip" for args in lines), code  # the page's shell blocks are commands
    return lines


@pytest.mark.slow
def test_the_fine_tuning_walk_through_runs_as_written(project, monkeypatch):
    """Every runnable block in order: `superclip import` through the installed script, the other commands
    through the same entry point in this process (`main`: one import of Lightning for them all), the
    python blocks in this process too."""
    blocks = runnable_blocks(PAGE.read_text())
    assert [lang for lang, _ in blocks] == ["python", "bash", "bash", "bash", "bash", "python", "bash"]
    monkeypatch.chdir(project)
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), {})
            continue
        for args in commands(code):
            if args[1] == "import":
                proc = run(args, project)
                assert proc.returncode == 0, (args, proc.stderr[-3000:])
            else:
                quiet = ["--trainer.enable_progress_bar", "false"] if args[1] in ("fit", "validate") else []
                assert main([*args[1:], *quiet]) == 0, args
    # LiT: the image tower (but its projection) is the imported one, bit for bit
    imported = load_file(project / "pretrained" / "model.safetensors")
    lit = load_file(project / "my-model" / "model.safetensors")
    tower = [k for k in imported if k.startswith("vision_model.")]
    assert tower and all(torch.equal(lit[k], imported[k]) for k in tower)
    assert not torch.equal(lit["visual_projection.weight"], imported["visual_projection.weight"])
    assert not torch.equal(lit["text_projection.weight"], imported["text_projection.weight"])
    assert (project / "outputs" / "lit-eval" / "superclip" / "version_0" / "results.md").is_file()
    # at 48 px with an EMA: an HF model at 48 px, the averaged weights exported
    assert CLIPConfig.from_pretrained(project / "my-model-48").vision_config.image_size == 48
    run_dir = project / "outputs" / "decay" / "superclip" / "version_0"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    key = "model.clip.text_model.encoder.layers.0.mlp.fc1.weight"
    exported = load_file(project / "my-model-48" / "model.safetensors")
    assert torch.equal(exported[key.removeprefix("model.clip.")], ckpt["state_dict"][key])
    assert not torch.equal(ckpt["state_dict"][key], ckpt["current_model_state"][key])


@pytest.mark.slow
def test_a_constant_run_extended_and_cooled_down_as_the_page_says(project, monkeypatch):
    """The page's two commands of the Schedules section, in this process (`main`, as the console script
    runs it): the second takes its schedule from its command, not from the checkpoint."""
    (code,) = [code for _, code, _ in all_blocks(PAGE.read_text()) if "--model.lr_schedule constant" in code]
    monkeypatch.chdir(project)
    for args in commands(code):
        assert main([*args[1:], "--trainer.enable_progress_bar", "false"]) == 0
    # extended from 8 to 12 steps with a 4-step cool-down: the peak rate until step 8, then down
    events = logged(project / "outputs" / "long" / "superclip" / "version_0", "train/lr")
    before = [e.value for e in events if 2 < e.step <= 8]
    after = [e.value for e in events if e.step > 8]
    assert before and before == pytest.approx([1e-3] * len(before))
    assert len(after) >= 2 and after == sorted(after, reverse=True) and after[-1] <= 0.5e-3


@pytest.mark.slow
def test_superclass_two_stages_at_the_debug_size(project, monkeypatch, capsys):
    """Stage 1 (the classification loss alone: zero-shot skipped in one line each, the probe runs),
    export, stage 2 (LiT from it, head dropped: zero-shot runs), through the entry point (`main`)."""
    monkeypatch.chdir(project)
    common = ["--config", "configs/debug.yaml", "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(["fit", *common, "--model.contrastive_loss_weight", "0",
                 "--trainer.logger.init_args.save_dir", "outputs/sc1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    skipped = [line.split("(")[0] for line in out.splitlines() if "contrastive_loss_weight is 0" in line]
    assert skipped == ["ZeroShotClassification", "ZeroShotRetrieval"]
    assert "linprobe/probe/top1" in out and "zeroshot/shape/top1" not in out
    ckpt = "outputs/sc1/superclip/version_0/checkpoints/last.ckpt"
    assert main(["export", "--ckpt_path", ckpt, "--output_dir", "sc-stage1", "--overwrite"]) == 0
    lit = ["--model.backbone", "sc-stage1", "--model.backbone_config", "null", "--model.lock_image", "true",
           "--model.lock_image_unlocked_layers", "1", "--model.class_loss_weight", "0"]  # fmt: skip
    assert main(["fit", *common, *lit, "--trainer.logger.init_args.save_dir", "outputs/sc2"]) == 0
    out = capsys.readouterr().out
    assert "zeroshot/shape/top1" in out and "contrastive_loss_weight is 0" not in out
