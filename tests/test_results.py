"""results.md / results.csv: one row per set with its main metric, the average per protocol, and a
``superclip validate`` with a two-set suite fragment that writes them beside metrics.json."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import distributed_eval as de
from conftest import MICRO
from superclip_pl import LinearProbe, ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.eval.results import Row, result_rows, write_results
from superclip_pl.train.module import LitSuperCLIP


def evaluated(callback, **values):
    callback.results = {f"{callback.prefix}/{callback.name}/{k}": v for k, v in values.items()}
    return callback


def test_rows_take_each_main_metric_and_average_within_a_protocol(tmp_path):
    callbacks = [
        evaluated(ZeroShotClassification("a", "o/a"), top1=0.5, top5=0.9, mean_per_class_recall=0.4),
        evaluated(
            ZeroShotClassification("b", "o/b", main_metric="mean_per_class_recall"),
            top1=0.3,
            top5=0.6,
            mean_per_class_recall=0.2,
        ),
        evaluated(
            ZeroShotRetrieval("c", "o/c", topk=(1, 5)),
            **{"i2t_R@1": 0.6, "t2i_R@1": 0.4, "i2t_R@5": 0.9, "t2i_R@5": 0.8},
        ),
        ZeroShotClassification("not-run", "o/d"),  # never evaluated: no row
        evaluated(LinearProbe("p", "o/p"), top1=0.7, top5=1.0, mean_per_class_recall=0.65),
    ]
    rows = result_rows(callbacks)
    assert rows == [
        Row("a", "zero-shot classification", "top1", 0.5),
        Row("b", "zero-shot classification", "mean_per_class_recall", 0.2),
        Row("c", "retrieval", "mean_R@1", pytest.approx(0.5)),
        Row("p", "linear probe", "top1", 0.7),
        Row("average", "zero-shot, 3 sets", "mean", pytest.approx((0.5 + 0.2 + 0.5) / 3)),
        Row("average", "linear probe, 1 sets", "mean", 0.7),
    ]
    paths = write_results(tmp_path, callbacks)
    assert [p.name for p in paths] == ["results.md", "results.csv"]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["set"] for r in table] == ["a", "b", "c", "p", "average", "average"]
    assert float(table[4]["value"]) == pytest.approx(0.4, abs=1e-6)
    assert "| **average** | zero-shot, 3 sets | mean | **0.4000** |" in (tmp_path / "results.md").read_text()
    assert write_results(tmp_path / "none", callbacks[3:4]) == []  # nothing evaluated: no files


def test_validate_with_a_two_set_suite_writes_metrics_json_and_results_md(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    de.save_checkpoint(
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0), tmp_path / "m.ckpt"
    )
    cls, ret = de.write_classification_set(tmp_path / "cls"), de.write_retrieval_set(tmp_path / "ret")
    (tmp_path / "run.yaml").write_text(f"""
trainer: {{accelerator: cpu, devices: 1, default_root_dir: {tmp_path / "out"}, enable_progress_bar: false}}
model: {{backbone_config: {json.dumps(MICRO)}, warmup_steps: 0}}
data:
  class_path: superclip_pl.ImageTextDataModule
  init_args:
    tokenizer: {tokenizer_dir}
    val: {{path: webdataset, data_files: "{ret}/test/*.tar", split: train}}
    batch_size: 4
    num_workers: 0
""")
    (tmp_path / "suite.yaml").write_text(f"""
trainer:
  callbacks:
    - class_path: superclip_pl.ZeroShotClassification
      init_args: {{name: colours, root: {cls}, num_workers: 0, main_metric: mean_per_class_recall}}
    - class_path: superclip_pl.ZeroShotRetrieval
      init_args: {{name: captions, root: {ret}, num_workers: 0}}
""")
    args = ["--config", str(tmp_path / "run.yaml"), "--config", str(tmp_path / "suite.yaml")]
    proc = subprocess.run(
        [sys.executable, "-m", "superclip_pl", "validate", *args, "--ckpt_path", str(tmp_path / "m.ckpt")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = next((tmp_path / "out").rglob("metrics.json")).parent
    metrics = json.loads((log_dir / "metrics.json").read_text())
    recall = metrics["zeroshot/colours/mean_per_class_recall"]
    r1 = (metrics["retrieval/captions/i2t_R@1"] + metrics["retrieval/captions/t2i_R@1"]) / 2
    lines = (log_dir / "results.md").read_text().splitlines()
    assert lines[2:5] == [
        f"| colours | zero-shot classification | mean_per_class_recall | {recall:.4f} |",
        f"| captions | retrieval | mean_R@1 | {r1:.4f} |",
        f"| **average** | zero-shot, 2 sets | mean | **{(recall + r1) / 2:.4f}** |",
    ]
    with open(log_dir / "results.csv") as f:
        assert float(list(csv.DictReader(f))[2]["value"]) == pytest.approx((recall + r1) / 2, abs=1e-6)
    closing = proc.stdout.strip().splitlines()[-1]  # the run's last line says where its results are
    assert closing.startswith("superclip validate: done")
    assert closing.endswith(f"metrics {log_dir / 'metrics.json'} (results.md, results.csv beside it)")
