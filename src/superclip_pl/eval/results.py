"""One table of a run's evaluations: ``results.md`` and ``results.csv`` beside ``metrics.json``.

One row per evaluated set with its main metric (each callback's ``main_metric``), then the average
of each protocol: zero-shot (classification and retrieval together) and linear probe. The average is
the plain mean of the rows' main metrics, as DataComp averages its 38 tasks
(``aggregate_scores.py`` in mlfoundations/datacomp: ``np.mean`` over every task's main metric).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from superclip_pl.eval.evaluation import SetEvaluation

# protocol of each metric namespace; results.md averages within a protocol, never across
PROTOCOLS = {"zeroshot": "zero-shot", "retrieval": "zero-shot", "linprobe": "linear probe"}


class Row(NamedTuple):
    set: str
    task: str
    metric: str
    value: float


def result_rows(evaluations: Sequence[SetEvaluation]) -> list[Row]:
    """The sets' rows (callback order; those not evaluated yet left out), then one average row per
    protocol (set ``average``, task ``<protocol>, <n> sets``)."""
    rows, groups = [], {}
    for c in evaluations:
        value = c.main_result()
        if value is None:
            continue
        rows.append(Row(c.name, c.task, c.main_metric, value))
        groups.setdefault(PROTOCOLS.get(c.prefix, c.prefix), []).append(value)
    for protocol, values in groups.items():
        rows.append(Row("average", f"{protocol}, {len(values)} sets", "mean", sum(values) / len(values)))
    return rows


def write_results(log_dir: Path, evaluations: Sequence[SetEvaluation]) -> list[Path]:
    """Write ``results.md`` and ``results.csv`` into ``log_dir``; returns their paths (none when no
    evaluation has run)."""
    rows = result_rows(evaluations)
    if not rows:
        return []
    md, table = Path(log_dir) / "results.md", Path(log_dir) / "results.csv"
    lines = ["| set | task | main metric | value |", "|---|---|---|---|"]
    for r in rows:
        value = f"{r.value:.4f}"
        cells = (f"**{r.set}**", r.task, r.metric, f"**{value}**") if r.set == "average" else (*r[:3], value)
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "The average is the plain mean of the main metrics of a protocol's sets, as DataComp averages "
        "its tasks; retrieval's mean_R@1 is the mean of i2t_R@1 and t2i_R@1. Every metric: metrics.json."
    )
    md.write_text("\n".join(lines) + f"\n\n{note}\n")
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Row._fields)
        writer.writerows((r.set, r.task, r.metric, f"{r.value:.6f}") for r in rows)
    return [md, table]
