"""Side-by-side timing on a shared, noisy machine: interleaved variants, per-round ratios, medians.

Other work on the same cores makes absolute times drift by tens of percent within a minute, so
variants are never timed in separate blocks. Each round runs every variant once, the order reversed
on every other round (ABBA...: a linear drift hits both sides equally), and a comparison is the
median over rounds of the ratio of the two variants' times in the same round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    variants: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` values each, after ``warmup`` untimed rounds.

    A variant that returns a float reports its own time (e.g. per step inside a longer run); one that
    returns None is timed by the wall clock around the call.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            reported = variants[name]()
            elapsed = time.perf_counter() - start if reported is None else reported
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][i] / times[den][i]``."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
