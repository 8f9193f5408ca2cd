"""A normal `superclip fit` through the installed console script prints its progress, its own lines
and where its outputs went: no third-party tips or deprecation warnings, a bar of steps against
max_steps, one closing line; SUPERCLIP_VERBOSE=1 brings the libraries' lines back."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import shapes  # noqa: F401  (the module-scoped shapes data set fixture)

SUPERCLIP = Path(sys.executable).parent / "superclip"
# every line a debug fit may print on stderr: Lightning's own run information and ours
EXPECTED_STDERR = [
    r"Seed set to \d+",
    r"(GPU|TPU|HPU) available: .*",
    r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.",
    r"data\.(train|val): \d+ samples read, \d+ skipped \(.*\)",
]


def fit(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [str(SUPERCLIP), "fit", "--config", "debug", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(shapes, tmp_path):  # noqa: F811
    (tmp_path / "data").symlink_to(shapes / "data")
    return tmp_path


@pytest.mark.slow
def test_a_debug_fit_prints_no_third_party_noise(project):
    proc = fit(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unexpected = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not any(re.fullmatch(p, line) for p in EXPECTED_STDERR)
    ]
    assert unexpected == []
    out = proc.stdout.splitlines()
    assert not any("Epoch 0/-2" in line or "v_num" in line for line in out)
    assert any(re.match(r"Step\s+\S+ 8/8 ", line) for line in out)  # steps against max_steps
    log_dir = project / "outputs/debug/superclip/version_0"
    assert re.fullmatch(
        rf"superclip fit: done, step 8/8, 64 samples seen, \d:\d\d:\d\d; checkpoint "
        rf"{re.escape(str(Path('outputs/debug/superclip/version_0/checkpoints/last.ckpt')))}; "
        rf"metrics {re.escape(str(Path('outputs/debug/superclip/version_0/metrics.json')))} "
        r"\(results\.md, results\.csv beside it\)",
        out[-1],
    ), out[-1]
    assert (log_dir / "checkpoints/last.ckpt").is_file() and (log_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_verbose_brings_the_libraries_lines_back(project):
    proc = fit(project, "--trainer.max_steps", "2", env={"SUPERCLIP_VERBOSE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "💡 Tip:" in proc.stderr
    assert "`isinstance(treespec, LeafSpec)` is deprecated" in proc.stderr
