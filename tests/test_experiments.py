"""The demo / ablation drivers' pure parts: run arguments, headline numbers, the summary over seeds."""

import pytest

from superclip_pl.ablation import gaps, summarise
from superclip_pl.experiments import RETRIEVAL_R1, ZEROSHOT_TOP1, Run, headline


def test_runs_see_the_same_samples_at_every_batch_size(tmp_path):
    small = Run("clip", "c.yaml", tmp_path, "v", batch_size=8, samples=10000, seed=2)
    large = Run("clip", "c.yaml", tmp_path, "v", batch_size=128, samples=10000, seed=2)
    assert (small.steps, large.steps) == (1250, 79)  # ceil: never fewer samples than asked
    args = dict(zip(small.args(progress=False)[1::2], small.args(progress=False)[2::2], strict=False))
    assert args["--trainer.max_steps"] == args["--trainer.val_check_interval"] == "1250"
    assert args["--model.warmup_steps"] == "200"  # 1600 warm-up samples at batch 8
    assert args["--seed_everything"] == args["--data.init_args.seed"] == "2"
    assert small.log_dir == tmp_path / "clip" / "v"


def metrics(zs: float, r1: float) -> dict:
    return {**{k: zs for k in ZEROSHOT_TOP1}, **{k: r1 for k in RETRIEVAL_R1}}


def test_headline_means():
    m = metrics(0.5, 0.2)
    m["zeroshot/shape/top1"] = 0.2
    assert headline(m) == pytest.approx({"zeroshot_mean_top1": 0.4, "retrieval_mean_R@1": 0.2})


def test_summary_over_seeds_and_gap():
    runs = {}
    for method, base in (("clip", 0.30), ("superclip", 0.35)):
        for seed, delta in enumerate((-0.01, 0.0, 0.01)):
            m = metrics(base + delta, base / 2 + delta)
            runs[f"{method}/bs16/seed{seed}"] = {
                "method": method,
                "batch_size": 16,
                "seed": seed,
                "metrics": {**m, **headline(m)},
            }
    summary = summarise(runs)
    entry = summary["superclip"]["16"]["zeroshot_mean_top1"]
    assert entry["mean"] == pytest.approx(0.35) and entry["std"] == pytest.approx(0.01)
    assert summary["clip"]["16"]["seeds"] == [0, 1, 2]
    gap = gaps(summary)["16"]
    assert gap["zeroshot_mean_top1"] == pytest.approx(0.05)
    assert gap["retrieval_mean_R@1"] == pytest.approx(0.025)
