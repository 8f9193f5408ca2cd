"""The documentation as a reader follows it: README.md and every docs/*.md page.

A page's fenced `bash` and `python` blocks run in order, in a fresh project directory holding a small
demo data set and the repository's `configs/`: bash blocks as scripts through the installed
`superclip` (every command must exit with status 0), python blocks in one namespace per page. A block
is left out only when the line before its fence is `<!-- not run: REASON -->`. `yaml` blocks must
parse, and those that are config fragments must pass `superclip fit --print_config` on top of
`configs/debug.yaml`. The README links every page, and every relative link points to a file.
"""

import os
import re
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from superclip_pl.cli.main import main
from test_cli import CONFIGS, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
CONFIG_KEYS = {"seed_everything", "trainer", "model", "data"}  # a yaml block naming one is a config
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the marker's reason

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language} block)"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order, each with the reason of its `not run` marker if any."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a code fence that is never closed"
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        out.append(Block(page, i + 1, fence.group(2), code, marker.group(1) if marker else None))
        i = end + 1
    return out


def links(page: Path) -> list[str]:
    """The relative link targets of a page (web links and in-page anchors left out), without anchors."""
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text())]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def run_bash(block: Block, project: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # where the installed `superclip` is
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    # errexit: every command must succeed; the ERR trap names the one that did not
    script = "set -e -o pipefail\ntrap 'echo \"failed: $BASH_COMMAND\" >&2' ERR\n" + block.code
    proc = subprocess.run(
        ["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"{block.where()} exited with status {proc.returncode}\n{block.code}"
        f"--- stdout (end) ---\n{proc.stdout[-1500:]}\n--- stderr (end) ---\n{proc.stderr[-3000:]}"
    )


def run_python(block: Block, scope: dict) -> None:
    # blank lines first, so that a traceback names the page and the line in it
    code = compile("\n" * block.line + block.code, str(block.page), "exec")
    try:
        exec(code, scope)
    except Exception:
        pytest.fail(f"{block.where()} raised\n{block.code}---\n{traceback.format_exc()[-3000:]}")


def check_yaml(block: Block, project: Path, capsys) -> None:
    try:
        config = yaml.safe_load(block.code)
    except yaml.YAMLError as err:
        pytest.fail(f"{block.where()} is not valid YAML: {err}")
    if not (isinstance(config, dict) and CONFIG_KEYS & config.keys()):
        return
    fragment = project / f"fragment-{block.page.stem}-{block.line}.yaml"
    fragment.write_text(block.code)
    capsys.readouterr()
    status = main(
        ["fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(fragment), "--print_config"]
    )
    err = capsys.readouterr().err
    assert status == 0, (
        f"{block.where()}: `superclip fit --print_config` refuses it\n{block.code}---\n{err[-2000:]}"
    )


def readme_did_what_it_says(project: Path, scope: dict) -> None:
    """The Quick start's own promises: 5 steps at the model's sizes, and an exported model."""
    trainer, model, data = scope["trainer"], scope["model"], scope["data"]
    assert trainer.global_step == 5
    assert data.image_size == model.image_size == 64 and data.max_length == model.max_length == 77
    assert (project / "my-clip" / "model.safetensors").is_file()


AFTERWARDS = {README: readme_did_what_it_says}
# pages whose blocks a test of their own runs as written, then checks what they promise: run once there
OWN_TEST = {DOCS / "fine_tuning.md": ROOT / "tests" / "test_docs_fine_tuning.py"}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_the_page_runs_as_written(page, shapes, tmp_path, monkeypatch, capsys):  # noqa: F811
    if page in OWN_TEST:
        assert f'"{page.name}"' in OWN_TEST[page].read_text()  # that test reads this page
        pytest.skip(f"{page.name} runs in {OWN_TEST[page].name}")
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").symlink_to(shapes / "data")
    (project / "configs").symlink_to(CONFIGS)
    monkeypatch.chdir(project)
    scope: dict = {"__name__": "__main__"}
    for block in blocks(page):
        if block.not_run is not None:
            continue
        if block.language == "bash":
            run_bash(block, project)
        elif block.language == "python":
            run_python(block, scope)
        elif block.language == "yaml":
            check_yaml(block, project, capsys)
    if page in AFTERWARDS:
        AFTERWARDS[page](project, scope)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_a_not_run_marker_gives_its_reason_and_sits_on_a_fence(page):
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if "not run" in line and line.strip().startswith("<!--"):
            where = f"{page.relative_to(ROOT)}:{i + 1}"
            assert MARKER.fullmatch(line.strip()), f"{where}: write it as `<!-- not run: REASON -->`"
            assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                f"{where}: the marker must sit on a fence"
            )


def test_the_quick_start_is_two_commands_then_the_superclip_commands():
    lines = README.read_text().splitlines()
    start = lines.index("## Quick start") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("## ")) + 1
    first, *rest = [b for b in blocks(README) if start < b.line < end]
    assert first.code.splitlines() == [
        "git clone <this repository> superclip-pl && cd superclip-pl",
        "make demo",
    ]
    run = [b for b in rest if b.not_run is None]
    assert [b.language for b in run] == ["bash", "python"]
    assert [line.split()[1] for line in run[0].code.splitlines()] == ["fit", "validate", "export"]


def test_the_readme_is_a_front_door_that_links_every_docs_page():
    assert len(README.read_text().splitlines()) <= 400
    linked = {(ROOT / target).resolve() for target in links(README)}
    unlinked = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert unlinked == [], "link these pages from the README"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_to_files(page):
    broken = [t for t in links(page) if not (page.parent / t).exists()]
    assert broken == [], f"{page_id(page)} links files that do not exist"


def test_every_file_in_docs_is_used_by_a_page():
    used = {(page.parent / t).resolve() for page in PAGES for t in links(page)}
    unused = [page_id(p) for p in sorted(DOCS.iterdir()) if p.suffix != ".md" and p.resolve() not in used]
    assert unused == [], "no page uses these files: delete them (git history keeps them)"
