"""``make demo``: CLIP and SuperCLIP trained alike on the shapes data, evaluated, compared side by side.

    python -m superclip_pl.demo [--samples 80000] [--batch-size 16] [--seeds 0 1 | --seed 0] [--jobs 2]

At each seed both runs see the same data in the same order from the same initial towers; only the
classification loss differs. Prints the comparison of the means over seeds and the headline numbers
seed by seed (with the spread between seeds). Writes ``<out>/summary.json`` and
``<out>/comparison.png``; TensorBoard logs stay in ``<out>/clip/seed<S>`` and ``<out>/superclip/seed<S>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from superclip_pl.shapes.runs import SHAPES_METRICS, Run, headline, pyplot, run_all

# the config files of each method's run: the CLIP baseline is the SuperCLIP run plus its differences
METHODS = {"clip": ("demo.yaml", "demo_clip.yaml"), "superclip": ("demo.yaml",)}


HEADLINE_NAMES = {
    "zeroshot_mean_top1": "zero-shot mean top-1",
    "retrieval_mean_R@1": "retrieval mean R@1",
    "probe_top1": "linear probe top-1",
}


def comparison_table(clip: dict[str, float], superclip: dict[str, float]) -> list[dict]:
    """One row per metric both runs have: CLIP, SuperCLIP and the difference."""
    keys = [k for k in [*SHAPES_METRICS, *HEADLINE_NAMES] if k in clip and k in superclip]
    return [
        {"metric": k, "clip": clip[k], "superclip": superclip[k], "difference": superclip[k] - clip[k]}
        for k in keys
    ]


def mean_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """The mean over seeds of every number all the runs have."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: statistics.fmean(r[k] for r in runs) for k in keys}


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    lines = [f"{'metric':<{width}}  {'CLIP':>7}  {'SuperCLIP':>9}  {'diff':>7}"]
    lines += [
        f"{r['metric']:<{width}}  {r['clip']:7.3f}  {r['superclip']:9.3f}  {r['difference']:+7.3f}"
        for r in rows
    ]
    return "\n".join(lines)


def format_seeds(seeds: list[int], clip: list[dict], superclip: list[dict]) -> str:
    """The headline numbers seed by seed, then their mean and the spread (max - min) over seeds."""
    keys = [k for k in HEADLINE_NAMES if all(k in r for r in [*clip, *superclip])]
    head = "  ".join(f"{HEADLINE_NAMES[k] + ' (CLIP / SuperCLIP / diff)':>46}" for k in keys)
    lines = [f"{'seed':>6}  {head}"]

    def cells(c: dict, s: dict) -> str:
        return "  ".join(f"{c[k]:>14.3f} / {s[k]:9.3f} / {s[k] - c[k]:+7.3f}" + " " * 8 for k in keys)

    lines += [f"{seed:>6}  {cells(c, s)}" for seed, c, s in zip(seeds, clip, superclip, strict=True)]
    if len(seeds) > 1:
        lines.append(f"{'mean':>6}  {cells(mean_metrics(clip), mean_metrics(superclip))}")
        spread = {
            name: {k: max(r[k] for r in runs) - min(r[k] for r in runs) for k in keys}
            for name, runs in (("clip", clip), ("superclip", superclip))
        }
        lines.append(
            f"{'spread':>6}  "
            + "  ".join(
                f"{spread['clip'][k]:>14.3f} / {spread['superclip'][k]:9.3f}" + " " * 18 for k in keys
            )
        )
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    rows = [r for r in rows if r["metric"].endswith(("top1", "_R@1")) and r["metric"] in SHAPES_METRICS]
    names = [
        r["metric"].replace("zeroshot/", "zs ").replace("retrieval/", "").replace("linprobe/", "")
        for r in rows
    ]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [r["clip"] for r in rows], 0.4, label="CLIP")
    ax.bar([i + 0.2 for i in x], [r["superclip"] for r in rows], 0.4, label="SuperCLIP")
    ax.set_xticks(list(x), names, rotation=25, ha="right")
    ax.set_ylabel("accuracy / recall")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=80000, help="training samples seen by each run")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both runs")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds of the initialisation and the data order"
    )
    seeds.add_argument("--seed", type=int, help="one seed (same as --seeds S)")
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs at once (1: one after the other, each with its live bar)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--configs-dir", type=Path, default=Path("configs"), help="where demo*.yaml are")
    parser.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="further `superclip fit` arguments for both runs (last on the line)",
    )
    args = parser.parse_args(argv)
    seed_list = [args.seed] if args.seed is not None else args.seeds
    if len(set(seed_list)) != len(seed_list):
        parser.error(f"--seeds {' '.join(map(str, seed_list))}: give each seed once")
    pyplot()  # fail now, not after the training, when the plots cannot be drawn
    configs = {name: [str(args.configs_dir / f) for f in files] for name, files in METHODS.items()}
    for config in {c for files in configs.values() for c in files}:
        if not Path(config).exists():
            raise SystemExit(f"{config} not found: run the demo from the repository root")
    if not Path("data/shapes/manifest.json").exists():
        raise SystemExit("data/shapes is missing: run `make data` first (`make demo` does it for you)")

    start = time.time()
    runs = [
        Run(
            name,
            config,
            args.output_dir,
            f"seed{seed}",
            args.batch_size,
            args.samples,
            seed,
            extra=args.extra,
        )
        for seed in seed_list
        for name, config in configs.items()
    ]
    results = [{**m, **headline(m)} for m in run_all(runs, jobs=args.jobs, desc="demo")]
    clip, superclip = results[0::2], results[1::2]  # per seed, in seed_list's order
    rows = comparison_table(mean_metrics(clip), mean_metrics(superclip))
    which = (
        f"seed {seed_list[0]}" if len(seed_list) == 1 else f"mean of seeds {', '.join(map(str, seed_list))}"
    )
    title = f"shapes, {args.samples} samples at batch {args.batch_size}, {which}"
    summary = {
        "setup": {
            "samples": args.samples,
            "batch_size": args.batch_size,
            "seeds": seed_list,
            "configs": configs,
            "seconds": round(time.time() - start, 1),
        },
        "seeds": {
            str(seed): {"clip": c, "superclip": s}
            for seed, c, s in zip(seed_list, clip, superclip, strict=True)
        },
        "comparison": rows,  # of the means over seeds
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_comparison(rows, args.output_dir / "comparison.png", title)
    print(f"\n{title}\n{format_table(rows)}\n")
    print(f"{format_seeds(seed_list, clip, superclip)}\n")
    print(f"summary: {args.output_dir / 'summary.json'}, plot: {args.output_dir / 'comparison.png'}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.output_dir}  (then open http://localhost:6006)")
    return summary


if __name__ == "__main__":
    main()
