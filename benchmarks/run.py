"""Run the benchmarks, print one table (measured, target, pass/fail), write ``outputs/bench/results.json``.

    python benchmarks/run.py [--quick] [--only NAME ...] [--threads N] [--strict]

Each benchmark is a module here with ``run(quick: bool = False) -> dict`` and ``TARGETS``:
result key (dotted for nested dicts) -> ``(op, threshold)``, or None for a figure shown without a
target. ``--quick`` runs toy sizes (seconds; the numbers then mean nothing). The exit status is 1
when a benchmark crashes, and with ``--strict`` also when a target is missed.

Threads: torch runs with ``--threads`` (default 1) intra-op threads. On a machine shared with other
work, OpenMP threads spin at barriers waiting for a sibling that has been descheduled: a tiny-preset
step measured 0.26 s with 1 thread and 1.0-1.2 s with 2 (load average 4 on 2 cores), and swung
from step to step. One thread gives ratios that hold still; use ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import operator
import os
import platform
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = [
    "head_overhead",
    "class_loss",
    "lightning_overhead",
    "eval_throughput",
    "data_pipeline",
    "linear_probe",
    "accumulation",
    "patch_dropout",
]
HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "outputs" / "bench" / "results.json"
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def lookup(result: dict, key: str):
    """``result["a"]["b"]`` for ``"a.b"``; a segment may also be an int key (JSON would make it a str)."""
    value = result
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part, value.get(int(part)) if part.lstrip("-").isdigit() else None)
    return value


def rows_of(name: str, result: dict, targets: dict) -> list[dict]:
    rows = []
    for key, target in targets.items():
        value = lookup(result, key)
        ok = None
        if target is not None:
            op, threshold = target
            ok = isinstance(value, int | float) and math.isfinite(value) and OPS[op](value, threshold)
        rows.append(
            {
                "name": f"{name}/{key}",
                "value": value,
                "target": None if target is None else f"{target[0]} {target[1]}",
                "passed": ok,
            }
        )
    return rows


def run_one(name: str, quick: bool) -> dict:
    module = importlib.import_module(name)
    start = time.perf_counter()
    # a benchmark without a quick mode runs at its own (full) size
    result = module.run(quick=quick) if "quick" in inspect.signature(module.run).parameters else module.run()
    seconds = time.perf_counter() - start
    targets = getattr(module, "TARGETS", {})
    return {"result": result, "rows": rows_of(name, result, targets), "seconds": seconds}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def print_table(report: dict) -> None:
    rows = [r for b in report["benchmarks"].values() for r in b.get("rows", [])]
    rows += [
        {"name": n, "value": "ERROR", "target": b["error"], "passed": False}
        for n, b in report["benchmarks"].items()
        if "error" in b
    ]
    width = max([len(r["name"]) for r in rows] + [9])
    print(f"\n{'benchmark':<{width}}  {'measured':>10}  {'target':<10}  result")
    for r in rows:
        verdict = {True: "pass", False: "FAIL", None: ""}[r["passed"]]
        print(f"{r['name']:<{width}}  {fmt(r['value']):>10}  {r['target'] or '':<10}  {verdict}")
    print(
        f"({'quick' if report['quick'] else 'full'} run, {report['threads']} thread(s), "
        f"{report['wall_s']:.0f} s in all)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the code paths in seconds")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"among {BENCHMARKS}")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"results JSON (default {OUTPUT})")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the subprocesses some benchmarks start
    import lightning.pytorch  # noqa: F401  (creates its logger, which the next line quiets)
    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no Trainer banners between rows

    report = {
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "benchmarks": {},
    }
    start = time.perf_counter()
    for name in args.only or BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            print(f"[{name}] not present, skipped")
            continue
        print(f"[{name}] running ...", flush=True)
        try:
            report["benchmarks"][name] = run_one(name, args.quick)
        except Exception as err:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            report["benchmarks"][name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s (cumulative)", flush=True)
    report["wall_s"] = time.perf_counter() - start

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_table(report)
    print(f"wrote {args.output}")
    crashed = any("error" in b for b in report["benchmarks"].values())
    missed = any(r["passed"] is False for b in report["benchmarks"].values() for r in b.get("rows", []))
    return int(crashed or (args.strict and missed))


if __name__ == "__main__":
    sys.exit(main())
