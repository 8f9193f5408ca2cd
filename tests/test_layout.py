"""The package's shape: the library never needs the demo or its plotting extra, imports go one way,
and files stay small enough to read in one sitting."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "superclip_pl"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The superclip_pl modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("superclip_pl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("superclip_pl"):
            # `from superclip_pl.eval import sets` imports the module superclip_pl.eval.sets
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def dynamic_imports(path: Path) -> list[tuple[str, bool]]:
    """Modules a file loads by name (``runpy.run_module``, ``importlib.import_module``, ``__import__``),
    each with whether the call sits under ``if __name__ == "__main__":`` (runs as a script only)."""
    tree = ast.parse(path.read_text())
    guarded = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'",)
        for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name in ("run_module", "import_module", "__import__") and isinstance(node.args[0].value, str):
            out.append((node.args[0].value, id(node) in guarded))
    return out


def test_the_library_never_imports_the_demo():
    library = [m for m in MODULES if not m.startswith("superclip_pl.shapes")]
    offenders = {m: sorted(i for i in GRAPH[m] if i.startswith("superclip_pl.shapes")) for m in library}
    assert {m: i for m, i in offenders.items() if i} == {}
    assert not any("matplotlib" in MODULES[m].read_text() for m in library)
    # by name: only `python -m superclip_pl.demo` runs the demo, and only when run as a script
    by_name = {m: dynamic_imports(MODULES[m]) for m in library}
    shapes = {m: d for m, loads in by_name.items() for d in loads if d[0].startswith("superclip_pl.shapes")}
    assert shapes == {"superclip_pl.demo": ("superclip_pl.shapes.demo", True)}


def test_imports_go_one_way():
    """No cycle among the package's modules (a package's __init__ re-exporting its own modules is the
    one allowed way down)."""

    def edges(m: str) -> set[str]:
        return {i for i in GRAPH[m] if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}

    path: list[str] = []  # the modules being visited, outermost first
    done: set[str] = set()
    cycles: list[str] = []

    def visit(m: str) -> None:
        path.append(m)
        for n in sorted(edges(m)):
            if n in path:
                cycles.append(" -> ".join([*path[path.index(n) :], n]))
            elif n not in done:
                visit(n)
        path.pop()
        done.add(m)

    for m in sorted(MODULES):
        if m not in done:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_files_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# Run first in every Python started with it on PYTHONPATH: matplotlib can neither be imported nor found
# in the installed distributions (the libraries underneath ask both before they import it)
HIDE_MATPLOTLIB = """
import importlib.abc, importlib.metadata as md, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

def hidden(real):
    def lookup(name, *args, **kwargs):
        if name.lower() == "matplotlib":
            raise md.PackageNotFoundError(name)
        return real(name, *args, **kwargs)
    return lookup

sys.meta_path.insert(0, Absent())
md.distribution, md.version = hidden(md.distribution), hidden(md.version)
"""


@pytest.fixture
def no_matplotlib(tmp_path) -> dict[str, str]:
    """An environment as where the demo extra (matplotlib) is not installed."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_MATPLOTLIB)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}


def test_the_library_and_its_cli_work_without_matplotlib(no_matplotlib):
    probe = (
        "import superclip_pl, superclip_pl.cli, superclip_pl.interop.export, sys; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=no_matplotlib, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    superclip = Path(sys.executable).parent / "superclip"  # the installed console script
    cmd = [str(superclip), "fit", "--config", "configs/debug.yaml", "--print_config"]
    out = subprocess.run(cmd, env=no_matplotlib, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "superclip_pl.ImageTextDataModule" in out.stdout


def test_the_demo_says_which_extra_it_needs(no_matplotlib):
    cmd = [sys.executable, "-m", "superclip_pl.shapes.demo", "--samples", "16"]
    out = subprocess.run(cmd, env=no_matplotlib, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "the demo's plots need matplotlib: pip install 'superclip-pl[demo]' (make install does it)"
    ]


def wing(module: str) -> str:
    """``cli``, ``train``, ``interop``, ``data``, ``eval``, ``shapes``, or ``method`` (the top level)."""
    parts = module.split(".")
    return (
        parts[1] if len(parts) > 2 or MODULES[module].name == "__init__.py" and len(parts) == 2 else "method"
    )


# what each wing may import: the method depends on nothing of ours; the Lightning system on the method;
# data, evaluation and other formats sit beside it; the command line and the demo put them together
MAY_IMPORT = {
    "method": {"method"},
    "train": {"method", "train"},
    "data": {"method", "data"},
    "interop": {"method", "interop"},
    "eval": {"method", "eval", "data", "interop"},
    "cli": {"method", "train", "data", "eval", "interop", "cli"},
    "shapes": {"method", "train", "data", "eval", "interop", "cli", "shapes"},
}
EXCEPTIONS = {
    "superclip_pl": "the package's face: imports each public name on first use",
    "superclip_pl.__main__": "python -m superclip_pl is the command line",
    # SuperCLIP.from_open_clip imports the open_clip reader inside the method, where it is used
    ("superclip_pl.model", "superclip_pl.interop.importer"): "imported inside from_open_clip",
}


def test_each_wing_imports_only_the_layers_below_or_beside_it():
    wrong = sorted(
        (m, i)
        for m in MODULES
        if m not in EXCEPTIONS
        for i in GRAPH[m]
        if wing(i) not in MAY_IMPORT[wing(m)] and (m, i) not in EXCEPTIONS
    )
    assert wrong == []
    # the one upward import is inside a function, never at module level
    tree = ast.parse(MODULES["superclip_pl.model"].read_text())
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and "interop" in (n.module or "")]
    assert top == []


def test_the_top_level_holds_the_method_and_the_face():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == [
        "__init__.py",
        "__main__.py",
        "demo.py",
        "errors.py",
        "head_file.py",
        "losses.py",
        "model.py",
        "patch_dropout.py",
        "presets.py",
        "resolution.py",
        "tokenizer.py",
        "transforms.py",
    ]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "cli",
        "data",
        "eval",
        "interop",
        "shapes",
        "train",
    ]
