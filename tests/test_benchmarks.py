"""The benchmarks run end to end at toy sizes and report every figure their targets name.

No timing assertions here (those are what ``make bench`` reports); these check the code paths, the
result keys and that each figure is a positive finite number.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark module the way ``benchmarks/run.py`` does (its folder on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run.py does; also keeps the shared CPU from thrashing
    yield importlib.import_module
    torch.set_num_threads(threads)


def assert_figures(module, result: dict) -> None:
    for key in module.TARGETS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{key}={value!r}"


@pytest.mark.parametrize("name", ["lightning_overhead", "eval_throughput", "linear_probe", "accumulation"])
def test_benchmark_reports_its_figures(bench, name):
    module = bench(name)
    assert_figures(module, module.run(quick=True))


def test_patch_dropout_reports_its_ratios(bench):
    module = bench("patch_dropout")
    result = module.run(quick=True)
    assert_figures(module, result)
    # the encoder's matrix products fall with the kept tokens; the text tower and the head do not
    assert result["flops_ratio_p75"] < result["flops_ratio_p50"] < 1


def test_data_pipeline_reports_every_row(bench):
    module, lookup = bench("data_pipeline"), bench("run").lookup
    result = module.run(quick=True)
    for key in module.TARGETS:  # dotted keys into the nested result, as run.py reads them
        value = lookup(result, key)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{key}={value!r}"


def test_head_overhead_reports_the_paper_flops_figure(bench):
    module = bench("head_overhead")
    result = module.run(quick=True)
    assert_figures(module, result)
    # the paper: +0.077% FLOPs for ViT-L/16 (counted at full size on the meta device, even in quick mode)
    assert 0.0005 < result["flops_ratio_vit_l16"] - 1 < 0.001


def test_run_prints_the_table_and_writes_results(bench, tmp_path, capsys):
    # class_loss through the aggregator: also checks that the sparse and dense losses agree
    run = bench("run")
    out = tmp_path / "results.json"
    assert run.main(["--quick", "--only", "class_loss", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["benchmarks"]["class_loss"]["result"]
    assert_figures(bench("class_loss"), result)
    rows = report["benchmarks"]["class_loss"]["rows"]
    assert {r["name"] for r in rows} == {"class_loss/peak_memory_ratio", "class_loss/time_ratio"}
    assert all(r["passed"] in (True, False) for r in rows)
    assert "class_loss/peak_memory_ratio" in capsys.readouterr().out


def test_interleaved_alternates_the_order_of_the_variants(bench):
    timing = bench("timing")
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # one warm-up round, then ABBA...
    assert len(times["a"]) == len(times["b"]) == 2


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"clip", "superclip", "clip compiled", "superclip compiled", "superclip fsdp2 1 step"}
    for name, row in rows.items():
        assert math.isfinite(row["loss"]) and "error" not in row, name
    assert rows["superclip fsdp2 1 step"]["sharded"]
    assert rows["superclip"]["model_gflops_per_step"] > rows["clip"]["model_gflops_per_step"] > 0


def test_gpu_check_skips_cleanly_without_cuda(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench("gpu_check").main([]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    """A very small shapes data set (8 training samples, 16 per evaluation set)."""
    from superclip_pl.shapes import dataset

    dataset.generate(
        tmp_path / "shapes",
        train_samples=8,
        eval_samples=16,
        retrieval_samples=4,
        shard_size=8,
        num_workers=1,
        progress=False,
    )
    return tmp_path / "shapes"


def test_attribute_probe_reports_every_figure(bench, tmp_path, shapes_dir, tokenizer_dir, batch):
    from conftest import MICRO, quiet_trainer
    from superclip_pl.train.module import LitSuperCLIP

    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    result = bench("attribute_probe").main(
        [str(tmp_path / "m.ckpt"), "--set", str(shapes_dir / "eval/shape")]
    )
    figures = result[str(tmp_path / "m.ckpt")]
    assert set(figures) == {"zeroshot_top1", "probe_cls", "probe_patch_mean", "probe_embedding", "chance"}
    assert figures["chance"] == 1 / 6 and all(0 <= v <= 1 for v in figures.values())  # the demo set's shapes


def test_attribute_learnability_reports_a_curve(bench, shapes_dir):
    result = bench("attribute_learnability").main(
        ["--attribute", "size", "--steps", "3", "--batch-size", "4", "--eval-every", "2"]
        + ["--eval-root", str(shapes_dir / "eval/size")]
    )["size"]
    assert [p["step"] for p in result["curve"]] == [2, 3]
    assert result["chance"] == 1 / 2 and all(0 <= p["top1"] <= 1 for p in result["curve"])
    assert all(p["loss"] > 0 for p in result["curve"])


def test_attribute_learnability_checks_the_demo_model(bench):
    """The primary style's tower is the one configs/demo.yaml trains (image size and preset overrides)."""
    model = yaml.safe_load((BENCH.parent / "configs/demo.yaml").read_text())["model"]
    image_size, overrides = bench("attribute_learnability").MODELS["primary"]
    assert (image_size, overrides) == (model["image_size"], model["backbone_config"])
