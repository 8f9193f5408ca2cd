"""Learning-rate schedules: a multiplier of the peak rate per optimizer step, linear warm-up first.

- ``cosine``: down to ``min_ratio`` at ``total_steps`` (the paper's; a run ends where it was planned).
- ``constant``: the peak rate after warm-up, however long the run goes: a run that can be extended.
- ``constant_cooldown``: constant, then over the last ``cooldown_steps`` before ``total_steps`` down to
  ``min_ratio``, as open_clip's ``const-cooldown`` (``open_clip_train/scheduler.py``, ``const_lr_cooldown``):
  ``(1 - e / cooldown_steps) ** power`` of the way from the peak to the end, ``power`` 1 a straight line.
  A ``constant`` run resumed with this schedule and a ``max_steps`` further on cools down at its new end.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "constant_cooldown")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant_cooldown(
    step: int, warmup_steps: int, total_steps: int, cooldown: int, min_ratio: float = 0.0, power: float = 1.0
) -> float:
    """LR multiplier: warm-up, 1 until ``total_steps - cooldown``, then the cool-down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = total_steps - cooldown
    if step < start:
        return 1.0
    done = min(1.0, (step - start) / max(1, cooldown))
    return min_ratio + (1 - min_ratio) * (1 - done) ** power


def lr_multiplier(
    schedule: str,
    step: int,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    cooldown_steps: int = 0,
    cooldown_power: float = 1.0,
) -> float:
    """The multiplier of ``schedule`` (one of ``SCHEDULES``) at ``step``."""
    if schedule == "cosine":
        return warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return constant_cooldown(step, warmup_steps, total_steps, cooldown_steps, min_ratio, cooldown_power)


def check_lr_settings(hp) -> None:
    """One line for a schedule or layer-decay setting of ``LitSuperCLIP`` (``hp``: its hyperparameters)
    that cannot work."""
    schedule, cooldown_steps, cooldown_power = hp["lr_schedule"], hp["cooldown_steps"], hp["cooldown_power"]
    for key in ("image_layer_decay", "text_layer_decay"):
        if hp[key] is not None and not 0 < hp[key] <= 1:
            raise ValueError(f"model.{key}={hp[key]} must be in (0, 1] (1 or null: no decay)")
    if schedule not in SCHEDULES:
        raise ValueError(f"model.lr_schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if schedule == "constant_cooldown" and (cooldown_steps is None or cooldown_steps < 1):
        raise ValueError(
            f"model.lr_schedule=constant_cooldown needs model.cooldown_steps >= 1 (got {cooldown_steps}): "
            "the optimizer steps at the end of max_steps over which the rate comes down"
        )
    if cooldown_power <= 0:
        raise ValueError(f"model.cooldown_power={cooldown_power} must be > 0 (1: linear)")
