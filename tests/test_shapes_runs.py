"""The demo / ablation drivers' pure parts: run arguments, headline numbers, the summary over seeds."""

import pytest

from superclip_pl.shapes.ablation import fingerprint, gaps, main, paired, plot, reusable, summarise
from superclip_pl.shapes.runs import RETRIEVAL_R1, ZEROSHOT_TOP1, Run, headline


def test_runs_see_the_same_samples_at_every_batch_size(tmp_path):
    small = Run("clip", ["c.yaml"], tmp_path, "v", batch_size=8, samples=10000, seed=2)
    large = Run("clip", ["c.yaml"], tmp_path, "v", batch_size=128, samples=10000, seed=2)
    assert (small.steps, large.steps) == (1250, 79)  # ceil: never fewer samples than asked
    args = dict(zip(small.args(progress=False)[1::2], small.args(progress=False)[2::2], strict=False))
    assert args["--trainer.max_steps"] == args["--trainer.val_check_interval"] == "1250"
    assert args["--model.warmup_steps"] == "200"  # 1600 warm-up samples at batch 8
    assert args["--seed_everything"] == args["--data.init_args.seed"] == "2"
    assert small.log_dir == tmp_path / "clip" / "v"


def test_evaluations_at_equal_samples_seen_across_batch_sizes(tmp_path):
    def interval(batch_size: int, every: int | None) -> str:
        run = Run("clip", ["c.yaml"], tmp_path, "v", batch_size=batch_size, samples=120000, eval_every=every)
        args = run.args(progress=False)
        return args[args.index("--trainer.val_check_interval") + 1]

    assert [interval(b, 20000) for b in (16, 32, 64, 128)] == ["1250", "625", "312", "156"]
    assert interval(64, None) == "1875"  # the end only
    assert interval(64, 10**6) == "1875" and interval(20000, 8) == "1"  # never past the end, never 0


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


def test_paired_differences_use_only_seeds_both_methods_finished(tmp_path):
    values = {"clip": {0: 0.40, 1: 0.50, 2: 0.45}, "superclip": {0: 0.43, 1: 0.49}}  # seed 2 still running
    runs = {}
    for method, by_seed in values.items():
        for seed, v in by_seed.items():
            m = metrics(v, v / 2)
            runs[f"{method}/bs32/seed{seed}"] = {
                "method": method,
                "batch_size": 32,
                "seed": seed,
                "metrics": {**m, **headline(m)},
            }
    diff = paired(summarise(runs))["32"]
    assert diff["seeds"] == [0, 1]
    zs = diff["zeroshot_mean_top1"]
    assert zs["mean"] == pytest.approx(0.01) and zs["wins"] == 1
    assert zs["std"] == pytest.approx(((0.03 - 0.01) ** 2 + (-0.01 - 0.01) ** 2) ** 0.5)
    assert diff["retrieval_mean_R@1"]["mean"] == pytest.approx(0.005)
    plot(summarise(runs), tmp_path / "a.png", samples=1000)
    only_one = {k: r for k, r in runs.items() if r["method"] == "superclip"}  # nothing to pair yet
    assert paired(summarise(only_one)) == {}
    plot(summarise(only_one), tmp_path / "b.png", samples=1000)
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_eval_every_below_one_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--eval-every", "0"])
    assert "--eval-every 0: give a number of samples >= 1" in capsys.readouterr().err


def test_headline_carries_the_probe_when_the_run_had_one():
    m = {**metrics(0.5, 0.2), "linprobe/probe/top1": 0.7}
    assert headline(m)["probe_top1"] == 0.7
    assert "probe_top1" not in headline(metrics(0.5, 0.2))


def test_ablation_summary_keeps_only_the_numbers_every_run_has():
    runs = {}
    for seed, probe in ((0, True), (1, False)):  # seed 1 from before the probe existed
        m = {**metrics(0.4, 0.2), **({"linprobe/probe/top1": 0.6} if probe else {})}
        runs[f"clip/bs16/seed{seed}"] = {
            "method": "clip",
            "batch_size": 16,
            "seed": seed,
            "metrics": headline(m),
        }
    entry = summarise(runs)["clip"]["16"]
    assert "probe_top1" not in entry and entry["zeroshot_mean_top1"]["values"] == pytest.approx([0.4, 0.4])


def test_the_demo_table_shows_every_seed_their_mean_and_spread():
    from superclip_pl.shapes.demo import comparison_table, format_seeds, mean_metrics

    clip = [headline({**metrics(0.3 + d, 0.1 + d), "linprobe/probe/top1": 0.5}) for d in (0.0, 0.02)]
    sup = [headline({**metrics(0.4 + d, 0.2 + d), "linprobe/probe/top1": 0.6}) for d in (0.0, 0.04)]
    mean = mean_metrics(sup)
    assert mean["zeroshot_mean_top1"] == pytest.approx(0.42) and mean["probe_top1"] == pytest.approx(0.6)
    rows = {r["metric"]: r for r in comparison_table(mean_metrics(clip), mean)}
    assert rows["retrieval_mean_R@1"]["difference"] == pytest.approx(0.11)
    lines = format_seeds([3, 5], clip, sup).splitlines()
    assert [line.split()[0] for line in lines] == ["seed", "3", "5", "mean", "spread"]
    assert "0.420" in lines[3] and "+0.110" in lines[3]  # SuperCLIP's mean zero-shot, the R@1 gap
    assert lines[4].split()[1:4] == ["0.020", "/", "0.040"]  # max - min over seeds, CLIP / SuperCLIP
    assert len(format_seeds([0], clip[:1], sup[:1]).splitlines()) == 2  # one seed: no mean, no spread


def test_an_ablation_reuses_only_runs_made_with_the_same_code_data_configs_and_settings(tmp_path):
    config, manifest = tmp_path / "demo.yaml", tmp_path / "manifest.json"
    config.write_text("model: {lr: 1.0e-3}\n")
    manifest.write_text('{"params": {"seed": 0}}')
    settings = {"samples": 40000, "eval_every": None, "extra": []}
    current = fingerprint([config], manifest, settings)
    assert current == fingerprint([config], manifest, dict(settings))  # a digest, not a timestamp
    assert current["code"] and current["libraries"]["torch"]
    changed = [
        fingerprint([config], manifest, {**settings, "samples": 20000}),
        fingerprint([config], manifest, {**settings, "extra": ["--model.lr", "3e-3"]}),
        fingerprint([config], manifest, {**settings, "eval_every": 10000}),
    ]
    config.write_text("model: {lr: 3.0e-3}\n")
    changed.append(fingerprint([config], manifest, settings))
    config.write_text("model: {lr: 1.0e-3}\n")
    manifest.write_text('{"params": {"seed": 1}}')  # the data set rendered differently
    changed.append(fingerprint([config], manifest, settings))
    assert all(c != current for c in changed)
    runs = {"clip/bs16/seed0": {"fingerprint": current}, "clip/bs16/seed1": {"fingerprint": changed[3]}}
    runs["superclip/bs16/seed0"] = {"method": "superclip"}  # from before fingerprints: not trusted
    assert list(reusable({"runs": runs}, current)) == ["clip/bs16/seed0"]
    assert reusable({}, current) == {}
