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


def lr_at(step: int, max_steps: int, lr: LRConfig, scale: float = 1.0) -> float:
    """The LR of optimizer step ``step`` (0-based): ``lr.peak · lr_multiplier(step) · scale``.

    ``scale`` is the separate rollback factor (≤ 1, see :class:`kcpt.train.anomaly.AnomalyDetector`): the
    schedule itself stays a function of the step, so a rollback never makes it fall behind the step counter.
    """
    return lr.peak * lr_multiplier(step, max_steps, lr) * scale


def make_scheduler(optimizer: torch.optim.Optimizer, max_steps: int,
                   lr: LRConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_multiplier` for plain PyTorch loops (the benchmarks' baseline); the stage loop
    sets :func:`lr_at` directly. Sets every param group's base LR to ``lr.peak`` first."""
    for group in optimizer.param_groups:
        group["lr"] = lr.peak
        group["initial_lr"] = lr.peak

    def fn(step: int) -> float:
        return lr_multiplier(step, max_steps, lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
