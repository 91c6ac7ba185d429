"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Steps are optimizer steps counted from 0. The multiplier of the peak LR is

- ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (step 0 already trains, it is not 0),
- ``min_ratio + (1 − min_ratio) · ½(1 + cos(π·p))`` after, with ``p = (step − warmup) / (max_steps − warmup)``
  clamped to [0, 1]: 1 at the end of warmup, ``min_ratio`` at ``max_steps`` and after.
"""

from __future__ import annotations

import math

import torch

from kcpt.config import LRConfig


def lr_multiplier(step: int, max_steps: int, lr: LRConfig) -> float:
    """Multiplier of ``lr.peak`` at optimizer step ``step`` (0-based) of a stage of ``max_steps`` steps."""
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    warm = lr.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    span = max_steps - warm
    p = 1.0 if span <= 0 else min(1.0, (step - warm) / span)
    return lr.min_ratio + (1.0 - lr.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_scheduler(optimizer: torch.optim.Optimizer, max_steps: int,
                   lr: LRConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_multiplier`; sets every param group's base LR to ``lr.peak`` first.

    Call ``scheduler.step()`` once after each ``optimizer.step()``. Its ``state_dict()`` holds only numbers
    (loads with ``torch.load(weights_only=True)``).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr.peak
        group["initial_lr"] = lr.peak

    def fn(step: int) -> float:
        return lr_multiplier(step, max_steps, lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def scale_base_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, factor: float) -> None:
    """Multiply the scheduler's base LRs (and the current LRs) by ``factor``, e.g. after an anomaly rollback.

    The change is part of ``scheduler.state_dict()`` (``base_lrs``), so it survives checkpoints. After a
    :class:`~kcpt.train.anomaly.StableSnapshot` restore (which restores the old base LRs) call this again.
    """
    scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
