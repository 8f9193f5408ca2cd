"""``make demo``: CLIP and SuperCLIP trained alike on the shapes data, evaluated, compared side by side.

    python -m superclip_pl.shapes.demo [--samples 20000] [--batch-size 16] [--seed 0] [--jobs 2]

Both runs see the same data in the same order from the same initial towers; only the classification
loss differs. Writes ``<out>/summary.json`` and ``<out>/comparison.png``; TensorBoard logs stay in
``<out>/clip`` and ``<out>/superclip``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from superclip_pl.shapes.runs import SHAPES_METRICS, Run, headline, pyplot, run_all

# the config files of each method's run: the CLIP baseline is the SuperCLIP run plus its differences
METHODS = {"clip": ("demo.yaml", "demo_clip.yaml"), "superclip": ("demo.yaml",)}


def comparison_table(clip: dict[str, float], superclip: dict[str, float]) -> list[dict]:
    keys = [*SHAPES_METRICS, "zeroshot_mean_top1", "retrieval_mean_R@1"]
    return [
        {"metric": k, "clip": clip[k], "superclip": superclip[k], "difference": superclip[k] - clip[k]}
        for k in keys
    ]


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    lines = [f"{'metric':<{width}}  {'CLIP':>7}  {'SuperCLIP':>9}  {'diff':>7}"]
    lines += [
        f"{r['metric']:<{width}}  {r['clip']:7.3f}  {r['superclip']:9.3f}  {r['difference']:+7.3f}"
        for r in rows
    ]
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    rows = [r for r in rows if r["metric"].endswith(("top1", "_R@1"))]
    names = [r["metric"].replace("zeroshot/", "zs ").replace("retrieval/", "") for r in rows]
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
    parser.add_argument("--samples", type=int, default=20000, help="training samples seen by each run")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
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
            f"seed{args.seed}",
            args.batch_size,
            args.samples,
            args.seed,
            extra=args.extra,
        )
        for name, config in configs.items()
    ]
    clip, superclip = ({**m, **headline(m)} for m in run_all(runs, jobs=args.jobs, desc="demo"))
    rows = comparison_table(clip, superclip)
    title = f"shapes, {args.samples} samples at batch {args.batch_size}, seed {args.seed}"
    summary = {
        "setup": {
            "samples": args.samples,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "configs": configs,
            "seconds": round(time.time() - start, 1),
        },
        "clip": clip,
        "superclip": superclip,
        "comparison": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_comparison(rows, args.output_dir / "comparison.png", title)
    print(f"\n{title}\n{format_table(rows)}\n")
    print(f"summary: {args.output_dir / 'summary.json'}, plot: {args.output_dir / 'comparison.png'}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.output_dir}  (then open http://localhost:6006)")
    return summary


if __name__ == "__main__":
    main()
