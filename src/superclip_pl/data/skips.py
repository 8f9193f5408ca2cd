"""Bad samples, counted: the reasons a sample is skipped, the per-role counts a data module keeps,
their sum over ranks, and the limit that stops a run whose data is mostly unusable.

Counts ride along with the batches (each worker attaches its skips to its next good sample), so
they add up exactly over DataLoader workers; `SkipCounts` adds each batch's once, in the main process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from superclip_pl.errors import BadDataStop

REASONS = (
    "missing_image",  # no image in the example, or its file cannot be read
    "corrupt_image",  # the bytes do not decode as an image (truncated, garbage, wrong column)
    "too_large",  # more than max_image_pixels, seen from the header before decoding
    "empty_caption",  # caption missing, empty or whitespace only, or no caption inside its JSON
    "truncated_shard",  # a shard (or run of them) that stops being readable; the rest is skipped
    "bad_row",  # a CSV row whose fields do not match the header, or that the csv reader rejects
)
ROLES = ("train", "val", "test", "predict")


def skip_problem(seen: int, skipped: Mapping[str, int], max_fraction: float) -> str | None:
    """What is wrong when more than `max_fraction` of the `seen` samples were skipped, else None."""
    total = sum(skipped.values())
    if not seen or total <= max_fraction * seen:
        return None
    details = ", ".join(f"{r}={n}" for r, n in skipped.items() if n)
    return (
        f"data: {total} of {seen} samples skipped ({total / seen:.1%}), more than "
        f"max_skip_fraction={max_fraction} ({details})"
    )


def check_skip_fraction(seen: int, skipped: Mapping[str, int], max_fraction: float, min_seen: int) -> None:
    """Raise when more than `max_fraction` of the `seen` samples were skipped (once `min_seen` are seen)."""
    if seen >= min_seen and (problem := skip_problem(seen, skipped, max_fraction)):
        raise BadDataStop(f"{problem}; fix the data or raise data.max_skip_fraction")


class SkipCounts:
    """Samples read (usable + skipped) and skipped per reason, per role, on this rank; for training
    also the totals over all ranks at the last `sync`."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.skipped: dict[str, Counter[str]] = {role: Counter() for role in ROLES}
        self.train_totals: tuple[int, dict[str, int]] | None = None

    def add(self, role: str, usable: int, skipped: Mapping[str, int]) -> None:
        self.seen[role] += usable + sum(skipped.values())
        self.skipped[role].update(skipped)

    def sync(self, strategy) -> dict[str, float]:
        """Sum the training counts over ranks (a collective: every rank calls it on the same step);
        returns them as metrics, `data/samples_read` and `data/skipped_<reason>`."""
        local = [self.seen["train"], *(self.skipped["train"][r] for r in REASONS)]
        total = strategy.reduce(torch.tensor(local, device=strategy.root_device), reduce_op="sum").tolist()
        seen, counts = int(total[0]), dict(zip(REASONS, map(int, total[1:]), strict=True))
        self.train_totals = (seen, counts)
        return {
            "data/samples_read": float(seen),
            **{f"data/skipped_{r}": float(n) for r, n in counts.items()},
        }

    def summary(self, role: str, world_size: int = 1) -> list[str]:
        """One line with the totals, then one line per skip reason."""
        seen, counts, where = self.seen[role], self.skipped[role], "this rank"
        if role == "train" and self.train_totals is not None and world_size > 1:
            (seen, counts), where = self.train_totals, "all ranks, at the last logged step"
        total = sum(counts.values())
        lines = [f"data.{role}: {seen} samples read, {total} skipped ({total / max(seen, 1):.2%}; {where})"]
        return lines + [f"data.{role}: skipped {n} {reason}" for reason, n in counts.items() if n]

    def train_state(self) -> dict:
        return {"seen": self.seen["train"], "skipped": dict(self.skipped["train"])}

    def load_train_state(self, state: Mapping) -> None:
        self.seen["train"], self.skipped["train"] = state["seen"], Counter(state["skipped"])
