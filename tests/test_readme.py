"""The README's quick start, as written: its `superclip` commands through the installed script and its
Python snippet, in a project directory holding a (small) demo data set."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import CONFIGS, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text()
    return text[text.index("## Quick start") : text.index("\n## ", text.index("## Quick start") + 1)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", quick_start(), flags=re.S)


@pytest.mark.slow
def test_the_quick_start_python_snippet_runs_as_written(shapes, monkeypatch):  # noqa: F811
    (snippet,) = blocks("python")
    monkeypatch.chdir(shapes)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    trainer, model, data = scope["trainer"], scope["model"], scope["data"]
    assert trainer.global_step == 5
    assert data.image_size == model.image_size == 64 and data.max_length == model.max_length == 77


@pytest.mark.slow
def test_the_quick_start_commands_run_as_written(shapes, tmp_path):  # noqa: F811
    commands = [line.split("#")[0].strip() for line in blocks("bash")[-1].splitlines()]
    commands = [c for c in commands if c.startswith("superclip ")]
    assert [c.split()[1] for c in commands] == ["fit", "validate", "export"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").symlink_to(shapes / "data")
    (project / "configs").symlink_to(CONFIGS)
    bin_dir = str(Path(sys.executable).parent)  # where the installed `superclip` is
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    assert (project / "my-clip" / "model.safetensors").is_file()
