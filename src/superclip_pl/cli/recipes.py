"""The shipped recipes: the repository's ``configs/``, installed as the package ``superclip_pl.recipes``
(pyproject.toml), so that a user who installed the package without cloning has them too.

``superclip recipes`` lists them, ``superclip recipes --copy DIR`` copies them into DIR to edit, and
``superclip fit --config NAME`` (``debug``, ``trainer/ddp``, with or without ``.yaml``) reads the shipped
file where no file of that name exists. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import re
import shutil
from importlib.resources import as_file, files
from pathlib import Path

from superclip_pl.errors import UserError

PACKAGE = "superclip_pl.recipes"
NAME = re.compile(r"[\w.-]+(/[\w.-]+)*")  # a recipe name or a relative path, nothing YAML-like


def recipes() -> dict[str, Path]:
    """``{name: file}`` of every shipped recipe, names relative to the folder, without ``.yaml``."""
    with as_file(files(PACKAGE)) as root:  # a real folder both installed and in a checkout
        return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def describe(path: Path, width: int = 96) -> str:
    """The first sentence of a recipe's opening comment, cut to ``width`` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or text.startswith("superclip "):  # a command line: the sentence is over
            break
        lines.append(text)
    # a sentence ends at ". " unless the word before is an abbreviation ("Gadre et al. 2023")
    end = r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bcf)\.\s"
    sentence = re.split(end, " ".join(lines), maxsplit=1)[0]
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def resolve_config(value: str) -> str:
    """``value`` of ``--config``: itself when it is a file (or YAML text); the shipped recipe it names
    otherwise; a one-line error when it is neither."""
    if Path(value).exists() or not NAME.fullmatch(value):
        return value
    found = recipes()
    name = value.removesuffix(".yaml").removeprefix("configs/")
    if name in found:
        return str(found[name])
    raise UserError(
        f"--config {value}: no such file, and no shipped recipe of that name; `superclip recipes` lists "
        f"them ({', '.join(sorted(found))})"
    )


def with_recipes(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` / ``-c`` value that names a shipped recipe replaced by its file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="superclip recipes",
        description="List the shipped configs (recipes), or copy them to edit. Any of them runs as "
        "`superclip fit --config NAME` where no file NAME exists (e.g. --config debug); where a config "
        "names data under data/shapes, make it first: python -m superclip_pl.shapes.dataset "
        "--output-dir data/shapes.",
    )
    p.add_argument("--copy", metavar="DIR", help="copy every recipe into DIR (its sub-folders kept)")
    p.add_argument("--overwrite", action="store_true", help="with --copy: replace files that exist")
    return p


def run_recipes(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    found = recipes()
    if args.copy is None:
        width = max(map(len, found))
        for name, path in found.items():
            print(f"{name:<{width}}  {describe(path)}")
        return
    out = Path(args.copy)
    targets = {name: out / f"{name}.yaml" for name in found}
    clash = [str(t) for t in targets.values() if t.exists()]
    if clash and not args.overwrite:
        raise FileExistsError(f"{clash[0]} exists ({len(clash)} of the recipes); pass --overwrite to replace")
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[name], target)
    print(f"{len(targets)} recipes copied to {out} (superclip fit --config {out / 'debug.yaml'})")
