"""``make ablation``: CLIP vs SuperCLIP across batch sizes at equal samples seen, several seeds.

    python -m superclip_pl.shapes.ablation [--batch-sizes 8 16 32 64 128] [--seeds 0 1 2] [--samples 80000]
                                    [--methods clip superclip] [--eval-every SAMPLES] [--jobs 2]
                                    [--output-dir outputs/ablation]
                                    [--extra ARGS FOR superclip fit ...]

The paper's teaser redone at small scale: the SuperCLIP - CLIP gap against batch size, on the demo
set (``primary`` style) and model. Finished runs are kept in ``results.json``, so an interrupted
ablation resumes where it stopped, and a smaller grid run first is completed by a larger one later
(``--fresh`` redoes everything). Writes ``results.json`` and ``ablation.png`` (mean +- std over seeds,
and SuperCLIP - CLIP paired by seed) for the zero-shot mean, the retrieval mean and the linear probe.

A finished run is reused only when it was made by the same code (the package's sources and the torch,
transformers and lightning versions), on the same data set (its manifest), with the same configs and
settings: ``results.json`` never mixes numbers that the code as it is would not give.

``make ablation`` runs the grid of docs/results.md (batch 16, 32, 64, 128; 3 seeds; 80k samples; evaluated at
the end): 50 min on 2 idle CPU cores with the data rendered (two runs at a time; docs/results.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import statistics
from pathlib import Path

import superclip_pl
from superclip_pl.shapes.demo import METHODS
from superclip_pl.shapes.runs import Run, headline, pyplot, run_all

HEADLINES = {
    "zeroshot_mean_top1": "zero-shot top-1 (mean of shape, colour, size)",
    "retrieval_mean_R@1": "retrieval R@1 (mean of i2t, t2i)",
    "probe_top1": "linear probe top-1 (shape)",
}


def fingerprint(configs: list[Path], data_manifest: Path, settings: dict) -> dict:
    """What a run's numbers depend on besides its method, batch size and seed: ``settings`` (samples,
    evaluations, extra arguments), sha256 digests of the config files, the data set's manifest and the
    package's sources, and the versions of the libraries that train it."""

    def digest(paths: list[Path], root: Path | None = None) -> str:
        h = hashlib.sha256()
        for path in paths:
            h.update(str(path.relative_to(root) if root else path.name).encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:16]

    package = Path(superclip_pl.__file__).parent
    return {
        **settings,
        "configs": digest([Path(c) for c in configs]),
        "data": digest([data_manifest]),
        "code": digest(sorted(package.rglob("*.py")), package),
        "libraries": {n: importlib.metadata.version(n) for n in ("torch", "transformers", "lightning")},
    }


def reusable(previous: dict, current: dict) -> dict:
    """The runs of an earlier ``results.json`` (``previous``) made with the ``current`` fingerprint."""
    return {k: r for k, r in previous.get("runs", {}).items() if r.get("fingerprint") == current}


def _keys(runs) -> list[str]:
    """The headline numbers every one of ``runs`` (dicts with ``metrics``) has."""
    return [k for k in HEADLINES if all(k in r["metrics"] for r in runs)]


def summarise(runs: dict[str, dict]) -> dict:
    """Mean, std and per-seed values of the headline metrics per method and batch size."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs.values():
        groups.setdefault((r["method"], r["batch_size"]), []).append(r)
    out = {}
    for (method, bs), rs in sorted(groups.items()):
        entry = {"seeds": sorted(r["seed"] for r in rs)}
        for key in _keys(rs):
            values = [r["metrics"][key] for r in sorted(rs, key=lambda r: r["seed"])]
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        out.setdefault(method, {})[str(bs)] = entry
    return out


def gaps(summary: dict) -> dict:
    """SuperCLIP - CLIP of the mean over seeds, per batch size and headline metric."""
    both = set(summary.get("clip", {})) & set(summary.get("superclip", {}))
    return {
        bs: {
            k: summary["superclip"][bs][k]["mean"] - summary["clip"][bs][k]["mean"]
            for k in HEADLINES
            if k in summary["superclip"][bs] and k in summary["clip"][bs]
        }
        for bs in sorted(both, key=int)
    }


def paired(summary: dict) -> dict:
    """SuperCLIP - CLIP seed by seed (same seed = same initialisation and data order), per batch size
    and headline metric: mean and std of the differences, and in how many seeds SuperCLIP is ahead.
    Only seeds both methods have finished count."""
    out = {}
    for bs in sorted(set(summary.get("clip", {})) & set(summary.get("superclip", {})), key=int):
        clip, sup = summary["clip"][bs], summary["superclip"][bs]
        seeds = sorted(set(clip["seeds"]) & set(sup["seeds"]))
        if not seeds:
            continue
        out[bs] = {"seeds": seeds}
        for key in (k for k in HEADLINES if k in clip and k in sup):
            by_seed = [dict(zip(entry["seeds"], entry[key]["values"], strict=True)) for entry in (clip, sup)]
            diffs = [by_seed[1][s] - by_seed[0][s] for s in seeds]
            out[bs][key] = {
                "mean": statistics.fmean(diffs),
                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "wins": sum(d > 0 for d in diffs),
            }
    return out


def _errorbars(ax, by_size: dict[str, dict], fmt: str, label: str) -> None:
    """One line of ``{"mean", "std"}`` entries keyed by batch size."""
    sizes = sorted(by_size, key=int)
    means, stds = ([by_size[b][k] for b in sizes] for k in ("mean", "std"))
    ax.errorbar([int(b) for b in sizes], means, yerr=stds, fmt=fmt, capsize=3, label=label)


def _batch_axis(ax, sizes: list[str]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(b) for b in sizes], sizes)
    ax.minorticks_off()
    ax.set_xlabel("batch size")


def plot(summary: dict, path: Path, samples: int) -> None:
    plt = pyplot()
    entries = [e for runs in summary.values() for e in runs.values()]
    keys = [k for k in HEADLINES if all(k in e for e in entries)]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 4))
    every_size = sorted({b for runs in summary.values() for b in runs}, key=int)
    for ax, key in zip(axes, keys, strict=False):
        label = HEADLINES[key]
        for method, style, name in (("clip", "o--", "CLIP"), ("superclip", "s-", "SuperCLIP")):
            if method in summary:
                _errorbars(ax, {b: entry[key] for b, entry in summary[method].items()}, style, name)
        _batch_axis(ax, every_size)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax, diffs = axes[-1], paired(summary)
    names = {
        "zeroshot_mean_top1": "zero-shot top-1",
        "retrieval_mean_R@1": "retrieval R@1",
        "probe_top1": "probe",
    }
    for key, style in zip(keys, ("o-", "s-", "^-"), strict=False):
        _errorbars(ax, {b: d[key] for b, d in diffs.items() if key in d}, style, names[key])
    ax.axhline(0.0, color="grey", linewidth=0.8)
    _batch_axis(ax, every_size)
    ax.set_ylabel("SuperCLIP - CLIP (paired by seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"shapes: CLIP vs SuperCLIP at {samples} samples seen (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS), help="which runs to make"
    )
    parser.add_argument("--samples", type=int, default=20000, help="training samples seen by every run")
    parser.add_argument(
        "--eval-every",
        type=int,
        metavar="SAMPLES",
        help="also evaluate every this many samples seen (learning curves in TensorBoard); default: "
        "at the end only",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (threads are split between them)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--configs-dir", type=Path, default=Path("configs"), help="where demo*.yaml are")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in results.json")
    parser.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="further `superclip fit` arguments for every run (last on the line)",
    )
    args = parser.parse_args(argv)
    pyplot()  # fail now, not after the training, when the plots cannot be drawn
    if args.eval_every is not None and args.eval_every < 1:
        parser.error(f"--eval-every {args.eval_every}: give a number of samples >= 1")
    if not Path("data/shapes/manifest.json").exists():
        raise SystemExit("data/shapes is missing: run `make data` first (`make ablation` does it for you)")
    results_path = args.output_dir / "results.json"
    previous = {} if args.fresh or not results_path.exists() else json.loads(results_path.read_text())
    configs = sorted({args.configs_dir / f for files in METHODS.values() for f in files})
    for config in configs:
        if not config.exists():
            raise SystemExit(f"{config} not found: run the ablation from the repository root")
    settings = {"samples": args.samples, "eval_every": args.eval_every, "extra": args.extra}
    setup = fingerprint(configs, Path("data/shapes/manifest.json"), settings)
    done = reusable(previous, setup)
    if len(done) < len(previous.get("runs", {})):
        print(
            f"ablation: {len(previous['runs']) - len(done)} runs in {results_path} were made with other "
            "code, data, configs or settings; they are redone"
        )

    grid = [(m, bs, s) for bs in args.batch_sizes for s in args.seeds for m in args.methods]
    todo = [g for g in grid if f"{g[0]}/bs{g[1]}/seed{g[2]}" not in done]
    runs = [
        Run(
            m,
            [str(args.configs_dir / f) for f in METHODS[m]],
            args.output_dir,
            f"bs{bs}-seed{s}",
            bs,
            args.samples,
            s,
            eval_every=args.eval_every,
            extra=args.extra,
        )
        for m, bs, s in todo
    ]
    print(
        f"ablation: {len(grid)} runs, {len(grid) - len(todo)} already done, {len(todo)} to go "
        f"({args.jobs} at a time)"
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def record(run: Run, metrics: dict) -> None:  # saved after every run: an interruption keeps them
        done[f"{run.name}/bs{run.batch_size}/seed{run.seed}"] = {
            "method": run.name,
            "batch_size": run.batch_size,
            "seed": run.seed,
            "fingerprint": setup,
            "metrics": {**metrics, **headline(metrics)},
        }
        summary = summarise(done)
        results = {
            "setup": setup,
            "summary": summary,
            "gap": gaps(summary),
            "paired": paired(summary),
            "runs": done,
        }
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    run_all(runs, jobs=args.jobs, desc="ablation", on_done=record)
    summary = summarise(done)
    plot(summary, args.output_dir / "ablation.png", args.samples)
    keys = [k for k in HEADLINES if all(k in d for d in paired(summary).values())]
    print(f"\n{'batch':>6}  " + "  ".join(f"{k:>36}" for k in keys))
    for bs, diff in paired(summary).items():
        clip, sup = summary["clip"][bs], summary["superclip"][bs]
        cells = [
            f"{clip[k]['mean']:.3f} -> {sup[k]['mean']:.3f} ({diff[k]['mean']:+.3f}, "
            f"{diff[k]['wins']}/{len(diff['seeds'])} seeds)"
            for k in keys
        ]
        print(f"{bs:>6}  " + "  ".join(f"{c:>36}" for c in cells))
    print(f"\nresults: {results_path}, plot: {args.output_dir / 'ablation.png'}")
    return json.loads(results_path.read_text())


if __name__ == "__main__":
    main()
