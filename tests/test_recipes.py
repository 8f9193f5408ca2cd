"""The shipped recipes (configs/ installed as superclip_pl.recipes): listed, copied, run by name, and
there for a user who installed a wheel without the repository."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from test_cli import CONFIGS, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

ROOT = CONFIGS.parent
SUPERCLIP = Path(sys.executable).parent / "superclip"
NAMES = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml"))


def superclip(*args: str, cwd: Path, env: dict | None = None, exe: Path = SUPERCLIP):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_package_list_ships_every_package_and_the_configs():
    """pyproject lists the packages by hand (configs/ is mapped into the package): none may be missing."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    folders = {"superclip_pl.recipes." + ".".join(p.relative_to(CONFIGS).parts) for p in CONFIGS.iterdir()}
    folders = {f for f in folders if (CONFIGS / f.split(".")[-1]).is_dir()} | {"superclip_pl.recipes"}
    assert sorted(setuptools["packages"]) == sorted(found | folders)
    assert setuptools["package-dir"]["superclip_pl.recipes"] == "configs"


def test_recipes_lists_each_config_with_its_first_sentence(tmp_path):
    proc = superclip("recipes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()}
    assert sorted(listed) == NAMES
    assert listed["debug"].startswith("A seconds-long run on the shapes data")
    assert listed["trainer/ddp"].startswith("Data parallel on every GPU of every node")
    assert listed["eval/datacomp"].startswith("DataComp's zero-shot evaluation suite (Gadre et al. 2023;")


def test_a_description_ends_at_a_sentence_not_at_an_abbreviation(tmp_path):
    from superclip_pl.cli.recipes import describe

    path = tmp_path / "r.yaml"
    path.write_text("# Locked towers (Zhai et al. 2022, e.g. LiT). Then.\n#   superclip fit\nmodel: {}\n")
    assert describe(path) == "Locked towers (Zhai et al. 2022, e.g. LiT)"
    assert describe(path, width=20) == "Locked towers (Zh..."


def test_recipes_copy_writes_the_files_and_refuses_to_overwrite(tmp_path):
    proc = superclip("recipes", "--copy", "mine", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in NAMES:
        assert (tmp_path / "mine" / f"{name}.yaml").read_bytes() == (CONFIGS / f"{name}.yaml").read_bytes()
    (tmp_path / "mine" / "debug.yaml").write_text("# edited\n")
    proc = superclip("recipes", "--copy", "mine", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"superclip recipes: error: mine/debug.yaml exists ({len(NAMES)} of the recipes); "
        "pass --overwrite to replace"
    ]
    assert (tmp_path / "mine" / "debug.yaml").read_text() == "# edited\n"
    assert superclip("recipes", "--copy", "mine", "--overwrite", cwd=tmp_path).returncode == 0
    assert (tmp_path / "mine" / "debug.yaml").read_bytes() == (CONFIGS / "debug.yaml").read_bytes()


def test_an_unknown_config_name_is_one_line(tmp_path):
    proc = superclip("fit", "--config", "debgu", cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("superclip fit: error: --config debgu: no such file, and no shipped recipe")
    assert "`superclip recipes` lists them (debug, demo," in line


def test_a_file_wins_over_a_recipe_of_the_same_name(tmp_path):
    (tmp_path / "debug").write_text("trainer: {max_steps: 3}\n")
    proc = superclip("fit", "--config", "debug", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in proc.stdout and "superclip_pl.ImageTextDataModule" not in proc.stdout


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_trains_a_recipe_without_the_checkout(shapes, tmp_path):  # noqa: F811
    """`pip wheel .`, installed into a new virtual environment (its dependencies read from this one's
    site-packages, the package itself only from the wheel), runs `superclip fit --config debug` on the
    demo data in a directory that holds no checkout."""
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist)]
    proc = subprocess.run([*build, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("superclip_pl-*.whl")
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    ours = subprocess.check_output(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    # a path line (not an import line) in a .pth: this environment's packages, but not its editable
    # superclip_pl, whose finder is installed by an import line of a .pth of its own
    (Path(site.decode().strip()) / "deps.pth").write_text(ours.decode().strip() + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").symlink_to(shapes / "data")
    where = subprocess.check_output(
        [str(python), "-c", "import superclip_pl.recipes as r; print(r.__file__)"], cwd=project, text=True
    )
    assert where.startswith(site.decode().strip()), where  # from the wheel, not the checkout
    proc = superclip(
        "fit", "--config", "debug", "--trainer.max_steps", "2", cwd=project, exe=python.parent / "superclip"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (project / "outputs/debug/superclip/version_0/checkpoints/last.ckpt").is_file()
    assert proc.stdout.strip().splitlines()[-1].startswith("superclip fit: done, step 2/2, 16 samples seen")
