"""Warmup + cosine LR multiplier and its LambdaLR wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from kcpt.config import LRConfig
from kcpt.train.schedule import lr_at, lr_multiplier, make_scheduler

LR = LRConfig(peak=1e-3, warmup_steps=4, min_ratio=0.1)


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1 / 5),             # step 0 trains: 1/(warmup+1), not 0
    (1, 2 / 5),
    (3, 4 / 5),
    (4, 1.0),               # end of warmup: peak
    (9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10))),   # halfway through the cosine: 0.55
    (14, 0.1),              # max_steps: floor
    (30, 0.1),              # past max_steps: stays at the floor
])
def test_multiplier_table(step, expected):
    assert lr_multiplier(step, 14, LR) == pytest.approx(expected)


def test_no_warmup_starts_at_peak_and_decays_monotonically():
    lr = LRConfig(peak=1.0, warmup_steps=0, min_ratio=0.0)
    vals = [lr_multiplier(s, 20, lr) for s in range(21)]
    assert vals[0] == 1.0 and vals[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(vals, vals[1:], strict=False))


def test_warmup_longer_than_stage_never_divides_by_zero():
    lr = LRConfig(peak=1.0, warmup_steps=10, min_ratio=0.2)
    assert lr_multiplier(5, 5, lr) == pytest.approx(6 / 11)
    assert lr_multiplier(10, 5, lr) == pytest.approx(0.2)


def _opt():
    p = torch.nn.Parameter(torch.zeros(3))
    return torch.optim.AdamW([p], lr=123.0)


def test_scheduler_applies_multiplier_times_peak_each_step():
    opt = _opt()
    sched = make_scheduler(opt, 14, LR)
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([LR.peak * lr_multiplier(s, 14, LR) for s in range(16)])


def test_lr_at_is_the_schedule_times_the_rollback_scale():
    for step in (0, 3, 6, 13, 20):
        assert lr_at(step, 14, LR) == pytest.approx(LR.peak * lr_multiplier(step, 14, LR))
        assert lr_at(step, 14, LR, 0.25) == pytest.approx(0.25 * LR.peak * lr_multiplier(step, 14, LR))
